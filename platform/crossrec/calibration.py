"""How the user vector of a target domain the model never trained on is put together (zero-shot calibration, the
domains `crossrec adapt` adds): a value the retriever uses and the bundle stores, so it lives below both."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Validation targets a new domain needs before its weights are chosen on them. Per-target NDCG@10 has a standard
# deviation of ~0.15 at these levels while the grid's values differ by ~0.005-0.01 on average: below a few hundred
# targets the choice follows noise. Measured on one domain (docs/RESULTS.md "A new domain: adapt"): 10 targets
# chose a popularity prior over 87 interactions, 0.21x textknn on test against text only's 0.77x; 101 chose well
# (0.95x), so the floor costs there what it saves at 10; 313 chose 1.25x. `--min-targets` moves it.
MIN_TARGETS = 300
# The learned part's weight where nothing is chosen: text only. On the four leave-one-domain-out folds validation
# chose 0 twice, 0.25 and 0.5, never the model as trained (1), which lost to text alone on office and kitchen
# (docs/RESULTS.md "Leave-one-domain-out").
TEXT_ONLY = 0.0


@dataclass(frozen=True)
class Calibration:
    """How the user vector of a target domain the model never trained on is put together, chosen on that domain's
    validation targets (crossrec.inference.calibrate_zero_shot; stored by `crossrec adapt` in bundle.json
    "adapted"): the learned part's weight against the text prior, the text prior's recency decay and the weight of
    history items from other domains. A domain without one uses the model as trained."""

    learned_weight: float
    text_prior_decay: float
    text_prior_cross: float

    def to_dict(self) -> dict[str, float]:
        return {
            "learned_weight": self.learned_weight,
            "text_prior_decay": self.text_prior_decay,
            "text_prior_cross": self.text_prior_cross,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        return cls(float(d["learned_weight"]), float(d["text_prior_decay"]), float(d["text_prior_cross"]))
