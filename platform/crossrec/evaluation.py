"""Evaluates a scorer on a split: full ranking per domain, overall, and cold-start slices.

A scorer is any callable `scorer(batch: TargetBatch) -> (len(batch), n_items[domain])` array whose column j
scores the domain's j-th item (global index `offset[domain] + j`); a 1-D array means the same scores for
every row. Baselines and trained models all go through this one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from crossrec.metrics import KS, metrics_from_ranks, rank_targets
from crossrec.splits import Splits, TargetBatch

__all__ = [
    "Scorer",
    "EvalResult",
    "evaluate",
    "format_table",
    "beyond_accuracy",
    "beyond_accuracy_metrics",
    "popularity_percentiles",
    "top_k_lists",
    "format_beyond",
    "format_slices",
    "POPULAR_SHARE",
]

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


def evaluate(
    splits: Splits,
    scorer: Scorer,
    split: str = "test",
    domains: list[str] | None = None,
    ks: tuple[int, ...] = KS,
    mask_history: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "evaluate",
    max_targets: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> EvalResult:
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
        return rows[shard[0] :: shard[1]]

    total = sum(len(rows_of(d)) for d in domains)
    bar = tqdm(total=total, desc=desc, unit="target", disable=not progress)
    for d in domains:
        rows = rows_of(d)
        off, n = splits.offset[d], splits.n_items[d]
        # Keep a score block near 32M floats whatever the catalog size.
        bs = batch_size or max(64, min(4096, int(3.2e7 // max(n, 1))))
        r_out = np.empty(len(rows))
        for s in range(0, len(rows), bs):
            batch = splits.batch(rows[s : s + bs], d)
            scores = np.asarray(scorer(batch))
            if scores.ndim == 1:
                scores = np.broadcast_to(scores, (len(batch), scores.shape[0]))
            if scores.shape != (len(batch), n):
                raise ValueError(f"scorer returned shape {scores.shape} for domain {d!r}, expected {(len(batch), n)}")
            in_dom = [h[(h >= off) & (h < off + n)] - off for h in batch.histories]
            tcol = splits.row_item[batch.rows] - off
            r_out[s : s + len(batch)] = rank_targets(scores, tcol, in_dom if mask_history else None)
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
        slices[d] = {name: {**metrics_from_ranks(r[m], ks), "n": int(m.sum())} for name, m in (("cold_item", ci),)}
    return EvalResult(metrics=metrics, n_targets=n_targets, slices=slices, ranks=ranks)


def format_table(
    results: dict[str, EvalResult], ks: tuple[int, ...] = KS, keys: tuple[str, ...] = ("recall", "ndcg", "mrr")
) -> str:
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
            lines.append(f"  {model:<22}" + "".join(f"{m[c]:8.4f}" if m[c] is not None else f"{'-':>8}" for c in cols))
    return "\n".join(lines)


# -- beyond accuracy --------------------------------------------------------------------------------------------
POPULAR_SHARE = 0.1  # "the most popular items": this fraction of a domain's catalog, by training interactions


def popularity_percentiles(counts: np.ndarray) -> np.ndarray:
    """(n,) training interactions per item -> each item's popularity percentile in [0, 100]: the share of the
    catalog strictly less popular, ties counted half (mid-rank), so equally popular items share one value."""
    counts = np.asarray(counts)
    order = np.sort(counts)
    below = np.searchsorted(order, counts, side="left")
    ties = np.searchsorted(order, counts, side="right") - below
    return 100.0 * (below + 0.5 * (ties - 1)) / max(1, len(counts) - 1)


def beyond_accuracy_metrics(
    top: np.ndarray, targets: np.ndarray, counts: np.ndarray, k: int = 10, popular_share: float = POPULAR_SHARE
) -> dict[str, float | int | None]:
    """Catalog coverage and popularity bias of top-k lists in one domain.

    top: (T, >=k) recommended item columns per target (best first); targets: (T,) target columns; counts: (n,)
    training interactions per item. Returns coverage@k (share of the catalog recommended at least once),
    popular_share@k (share of recommendations among the most popular `popular_share` of items, ties broken by
    item order), rec_pop_pct@k / target_pop_pct (mean popularity percentile of recommended items / of targets),
    and the counts behind them."""
    top = np.asarray(top)[:, :k]
    n = len(counts)
    popular = np.zeros(n, dtype=bool)
    popular[np.argsort(-np.asarray(counts), kind="stable")[: max(1, int(np.ceil(popular_share * n)))]] = True
    pct = popularity_percentiles(counts)
    flat = top[top >= 0]  # fewer than k candidates leave -1
    return {
        f"coverage@{k}": float(len(np.unique(flat)) / max(1, n)),
        f"popular_share@{k}": float(popular[flat].mean()) if len(flat) else None,
        f"rec_pop_pct@{k}": float(pct[flat].mean()) if len(flat) else None,
        "target_pop_pct": float(pct[np.asarray(targets)].mean()) if len(targets) else None,
        "n_items": int(n),
        "n_recommended": int(len(np.unique(flat))),
        "n_lists": int(len(top)),
    }


def top_k_lists(
    splits: Splits,
    scorer: Scorer,
    domain: str,
    split: str = "test",
    k: int = 10,
    mask_history: bool = True,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) top-k item columns (best first; ties to the smaller column, as ranks count them) and (T,) target
    columns of `domain`'s targets in `split`, history items masked as `evaluate` masks them."""
    rows = splits.targets(split, domain)
    off, n = splits.offset[domain], splits.n_items[domain]
    k = min(k, n)
    bs = batch_size or max(64, min(4096, int(3.2e7 // max(n, 1))))
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for s in range(0, len(rows), bs):
        batch = splits.batch(rows[s : s + bs], domain)
        scores = np.array(np.broadcast_to(np.asarray(scorer(batch), dtype=np.float64), (len(batch), n)))
        if mask_history:
            for r, h in enumerate(batch.histories):
                scores[r, h[(h >= off) & (h < off + n)] - off] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(batch), 1))
        # Order the k by score, then column (a stable lexsort), as ties go to the smaller item index.
        keys = np.take_along_axis(scores, part, 1)
        order = np.lexsort((part, -keys), axis=1)
        top = np.take_along_axis(part, order, 1)
        top[np.take_along_axis(keys, order, 1) == -np.inf] = -1
        out[s : s + len(batch)] = top
    return out, splits.row_item[rows] - off


def beyond_accuracy(
    splits: Splits,
    scorer: Scorer,
    split: str = "test",
    domains: list[str] | None = None,
    k: int = 10,
    mask_history: bool = True,
) -> dict[str, dict]:
    """beyond_accuracy_metrics per domain, and `all`: coverage over the catalogs together, the other shares over
    every recommendation (a second pass of the scorer: `evaluate` keeps ranks, not lists)."""
    out, n_recs = {}, {}
    for d in splits.domains if domains is None else domains:
        off, n = splits.offset[d], splits.n_items[d]
        top, targets = top_k_lists(splits, scorer, d, split, k, mask_history)
        out[d] = beyond_accuracy_metrics(top, targets, splits.train_count[off : off + n], k)
        n_recs[d] = int((top >= 0).sum())
    if not out:
        return out

    def mean(key: str, weight: dict) -> float | None:
        vals = [(float(m[key] or 0.0), weight[d]) for d, m in out.items() if m[key] is not None]
        return sum(v * w for v, w in vals) / max(1, sum(w for _, w in vals)) if vals else None

    per = dict(out)
    out["all"] = {
        f"coverage@{k}": sum(int(m["n_recommended"] or 0) for m in per.values())
        / max(1, sum(int(m["n_items"] or 0) for m in per.values())),
        f"popular_share@{k}": mean(f"popular_share@{k}", n_recs),
        f"rec_pop_pct@{k}": mean(f"rec_pop_pct@{k}", n_recs),
        "target_pop_pct": mean("target_pop_pct", {d: m["n_lists"] for d, m in per.items()}),
        "n_items": sum(int(m["n_items"] or 0) for m in per.values()),
        "n_recommended": sum(int(m["n_recommended"] or 0) for m in per.values()),
        "n_lists": sum(int(m["n_lists"] or 0) for m in per.values()),
    }
    return out


def format_beyond(results: dict[str, dict], k: int = 10) -> str:
    """A block per domain, a row per model: coverage, popular share and popularity percentiles."""
    first = next(iter(results.values()))
    lines = [
        f"beyond accuracy (top {k}): coverage = share of the catalog recommended; popular = share of "
        f"recommendations among the top {POPULAR_SHARE:.0%} most popular items; pop pct = mean popularity "
        "percentile of recommended items (targets: the same for what users chose)"
    ]
    for d in first:
        m0 = first[d]
        tpct = "-" if m0["target_pop_pct"] is None else f"{m0['target_pop_pct']:.1f}"  # None: no targets there
        lines.append(f"{d}  ({m0['n_items']} items; targets' pop pct {tpct})")
        lines.append(f"  {'model':<22}{'coverage':>10}{'popular':>10}{'pop pct':>10}")
        for model, res in results.items():
            m = res[d]
            cells = [m[f"coverage@{k}"], m[f"popular_share@{k}"], m[f"rec_pop_pct@{k}"]]
            lines.append(
                f"  {model:<22}"
                + "".join(
                    f"{'-':>10}" if v is None else f"{v:10.1f}" if i == 2 else f"{v:10.4f}" for i, v in enumerate(cells)
                )
            )
    return "\n".join(lines)


def format_slices(results: dict[str, EvalResult], metric: str = "ndcg@10") -> str:
    """The cold-start slices of each model (target items unseen in training), beside each domain's overall value.
    Users new to a domain are a protocol of their own (`--protocol cold-user`), not a slice."""
    first = next(iter(results.values()))
    names = list(next(iter(first.slices.values()))) if first.slices else []
    lines = [f"slices ({metric}; n = targets in the slice)"]
    lines.append(f"  {'domain':<10}{'model':<22}{'overall':>9}" + "".join(f"{s:>18}" for s in names))
    for d in first.slices:
        for model, res in results.items():
            sl = res.slices[d]
            cells = "".join(
                f"{'-':>9} (n={sl[s]['n']:>5})"
                if sl[s][metric] is None
                else f"{sl[s][metric]:9.4f} (n={sl[s]['n']:>5})"
                for s in names
            )
            overall = res.metrics[d][metric]
            lines.append(f"  {d:<10}{model:<22}{'-' if overall is None else f'{overall:.4f}':>9}{cells}")
    return "\n".join(lines)
