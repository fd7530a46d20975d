"""Baselines reported beside every model. Each is `Baseline(splits) -> scorer` (see crossrec.evaluation)."""
from crossrec.baselines.popularity import Popularity

__all__ = ["BASELINES", "Popularity"]

BASELINES = {"popularity": Popularity}
