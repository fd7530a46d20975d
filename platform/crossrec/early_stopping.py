"""The validation metric every trainer reports each epoch, and the one patience rule that stops a run.

`train_func`s keep a `state` dict (epoch, best, bad_epochs, history) in their checkpoints; `record_epoch` updates
it, and `out_of_patience` tells from a finished run's history whether that rule ended it (the sweep's report).
"""

from __future__ import annotations

__all__ = ["VALID_METRIC", "new_state", "record_epoch", "out_of_patience"]

VALID_METRIC = "valid/ndcg@10"  # full ranking of validation targets; checkpoints, ASHA and patience use it


def new_state() -> dict:
    """A trainer's bookkeeping before its first epoch (saved in every checkpoint as state.json)."""
    return {"epoch": 0, "step": 0, "best": -1.0, "bad_epochs": 0, "history": []}


def record_epoch(state: dict, metrics: dict, patience: int) -> bool:
    """Appends an epoch's metrics to `state`; True when `patience` epochs in a row passed without a new best of
    VALID_METRIC (0: never stop)."""
    state["epoch"] += 1
    improved = metrics[VALID_METRIC] > state["best"]
    state["best"] = max(state["best"], metrics[VALID_METRIC])
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    state["history"].append(metrics)
    return bool(patience) and state["bad_epochs"] >= patience


def out_of_patience(history: list[dict], patience: int) -> bool:
    """Whether `record_epoch` stopped the run whose per-epoch metrics are `history`."""
    state, stop = new_state(), False
    for metrics in history:
        stop = record_epoch(state, metrics, patience)
    return stop
