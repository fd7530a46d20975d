"""Evaluates a scorer on a split: full ranking per domain, overall, and cold-start slices.

A scorer is any callable `scorer(batch: TargetBatch) -> (len(batch), n_items[domain])` array whose column j
scores the domain's j-th item (global index `offset[domain] + j`); a 1-D array means the same scores for
every row. Baselines and trained models all go through this one loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from crossrec.metrics import KS, metrics_from_ranks, rank_targets
from crossrec.splits import Splits, TargetBatch

__all__ = ["Scorer", "EvalResult", "evaluate", "format_table"]

Scorer = Callable[[TargetBatch], np.ndarray]


@dataclass
class EvalResult:
    """metrics[domain or 'all'][metric@k]; slices[domain or 'all'][slice] = metrics + `n`. Slice: `cold_item`
    (target items never seen in training). Users new to a domain have their own protocol (`Splits(protocol=
    "cold-user")`): leave-one-out never produces them, so it has no such slice."""

    metrics: dict[str, dict[str, float | None]]
    n_targets: dict[str, int]
    slices: dict[str, dict[str, dict]] = field(default_factory=dict)
    ranks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def evaluate(splits: Splits, scorer: Scorer, split: str = "test", domains: list[str] | None = None,
             ks: tuple[int, ...] = KS, mask_history: bool = True, batch_size: int | None = None,
             progress: bool = False, desc: str = "evaluate", max_targets: int = 0,
             shard: tuple[int, int] = (0, 1)) -> EvalResult:
    """max_targets > 0 keeps that many targets per domain, evenly spaced (a fixed subset: validation during
    training); shard=(rank, world) keeps every world-th of them (workers split the work)."""
    domains = list(splits.domains if domains is None else domains)
    for d in domains:
        splits.check_domain(d)
    ranks, cold_item = {}, {}
    def rows_of(d: str) -> np.ndarray:
        rows = splits.targets(split, d)
        if max_targets and len(rows) > max_targets:
            rows = rows[np.linspace(0, len(rows) - 1, max_targets).astype(np.int64)]
        return rows[shard[0]::shard[1]]

    total = sum(len(rows_of(d)) for d in domains)
    bar = tqdm(total=total, desc=desc, unit="target", disable=not progress)
    for d in domains:
        rows = rows_of(d)
        off, n = splits.offset[d], splits.n_items[d]
        # Keep a score block near 32M floats whatever the catalog size.
        bs = batch_size or max(64, min(4096, int(3.2e7 // max(n, 1))))
        r_out = np.empty(len(rows))
        for s in range(0, len(rows), bs):
            batch = splits.batch(rows[s:s + bs], d)
            scores = np.asarray(scorer(batch))
            if scores.ndim == 1:
                scores = np.broadcast_to(scores, (len(batch), scores.shape[0]))
            if scores.shape != (len(batch), n):
                raise ValueError(f"scorer returned shape {scores.shape} for domain {d!r}, "
                                 f"expected {(len(batch), n)}")
            in_dom = [h[(h >= off) & (h < off + n)] - off for h in batch.histories]
            tcol = splits.row_item[batch.rows] - off
            r_out[s:s + len(batch)] = rank_targets(scores, tcol, in_dom if mask_history else None)
            bar.update(len(batch))
        ranks[d] = r_out
        cold_item[d] = splits.train_count[splits.row_item[rows]] == 0
    bar.close()
    metrics = {d: metrics_from_ranks(ranks[d], ks) for d in domains}
    n_targets = {d: int(len(ranks[d])) for d in domains}
    all_r = np.concatenate([ranks[d] for d in domains]) if domains else np.zeros(0)
    metrics["all"], n_targets["all"] = metrics_from_ranks(all_r, ks), int(len(all_r))
    slices = {}
    for d in domains + ["all"]:
        r = all_r if d == "all" else ranks[d]
        ci = np.concatenate([cold_item[x] for x in domains]) if d == "all" else cold_item[d]
        slices[d] = {name: {**metrics_from_ranks(r[m], ks), "n": int(m.sum())}
                     for name, m in (("cold_item", ci),)}
    return EvalResult(metrics=metrics, n_targets=n_targets, slices=slices, ranks=ranks)


def format_table(results: dict[str, EvalResult], ks: tuple[int, ...] = KS, keys: tuple[str, ...] = ("recall", "ndcg", "mrr")) -> str:
    """One block per domain, a row per model: what `crossrec evaluate` prints."""
    cols = [f"{m}@{k}" for m in keys for k in ks]
    head = [f"{m[0].upper()}@{k}" for m in keys for k in ks]
    first = next(iter(results.values()))
    lines = []
    for d in first.metrics:
        lines.append(f"{d}  ({first.n_targets[d]} targets)")
        lines.append(f"  {'model':<22}" + "".join(f"{h:>8}" for h in head))
        for model, res in results.items():
            m = res.metrics[d]
            lines.append(f"  {model:<22}" + "".join(f"{m[c]:8.4f}" if m[c] is not None else f"{'-':>8}"
                                                     for c in cols))
    return "\n".join(lines)
