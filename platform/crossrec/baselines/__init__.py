"""Baselines reported beside every model.

`BASELINES[name]` is a factory `make(splits, data, backbone, text_template, max_tokens, *, progress=False,
domains=None) -> scorer` (fitted on the validation targets of `domains`, the domains evaluated) (see crossrec.evaluation for the scorer protocol): every baseline gets the same arguments and uses
what it needs (popularity only the splits; textknn the catalog text and a backbone).
"""

from __future__ import annotations

from typing import Protocol

from crossrec.baselines.popularity import Popularity
from crossrec.baselines.textknn import TextKNN, fit_textknn
from crossrec.dataset import Dataset
from crossrec.evaluation import Scorer
from crossrec.splits import Splits

__all__ = ["BASELINES", "BaselineFactory", "Popularity", "TextKNN"]


class BaselineFactory(Protocol):
    def __call__(
        self,
        splits: Splits,
        data: Dataset,
        backbone: str,
        text_template: str,
        max_tokens: int,
        *,
        progress: bool = False,
        domains: list[str] | None = None,
    ) -> Scorer: ...


def make_popularity(
    splits: Splits,
    data: Dataset,
    backbone: str,
    text_template: str,
    max_tokens: int,
    *,
    progress: bool = False,
    domains: list[str] | None = None,
) -> Popularity:
    return Popularity(splits)


def make_textknn(
    splits: Splits,
    data: Dataset,
    backbone: str,
    text_template: str,
    max_tokens: int,
    *,
    progress: bool = False,
    domains: list[str] | None = None,
) -> TextKNN:
    """Frozen backbone vectors of the catalog (embedded in-process, or read from the vector cache); decay and
    cross-domain weight chosen on the validation targets of `domains` (default: all), the domains evaluated, as
    a model is calibrated on them."""
    from crossrec.inference import backbone_vectors

    return fit_textknn(
        splits, backbone_vectors(data, splits, backbone, text_template, max_tokens, progress=progress), domains=domains
    )


BASELINES: dict[str, BaselineFactory] = {"popularity": make_popularity, "textknn": make_textknn}
