"""How the user vector of a target domain the model never trained on is put together (zero-shot calibration, the
domains `crossrec adapt` adds): a value the retriever uses and the bundle stores, so it lives below both."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
