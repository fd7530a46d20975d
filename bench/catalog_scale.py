"""Retrieval at catalog scale: a synthetic catalog of N items served through the real `Recommender`, exact scan
against the ANN index (crossrec.index), one request at a time.

    .venv/bin/python bench/catalog_scale.py --items 40000 300000 1000000 --json bench/results/catalog_scale.json

Items are drawn around real MiniLM vectors of the vendored art-office catalog (a sample of `--base` items embedded
once, cached): a random real item's text vector plus Gaussian noise, renormalised, and a learned part that is a
fixed random map of it plus noise, renormalised, as the adaptor makes ([learned (--dim) | text (384)], the
bundle's layout). The model is an untrained CrossRecModel (tower and text prior as a trained bundle has them), the
history 1-10 random items of the catalog. No priors (a synthetic catalog has no interactions). Per N: index build
time (nprobe tuned as export tunes it), recall@10 of the ANN answers against the exact answers, p50/p99 per
request for both, and the process's peak RSS. Prints a table, writes `--json` rows and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).parents[1]


def base_vectors(n: int) -> np.ndarray:
    """(n, 384) MiniLM vectors of the first n items of data/amazon-art-office (cached by crossrec's vector cache)."""
    from crossrec.dataset import Dataset, prepare
    from crossrec.inference import backbone_vectors
    from crossrec.splits import Splits

    out = Path(tempfile.gettempdir()) / "crossrec-catalog-scale" / "ao"
    if not (out / "manifest.json").is_file():
        prepare([REPO / "data" / "amazon-art-office"], out, progress=False)
    data = Dataset.load(out)
    sp = Splits(data)
    vecs = backbone_vectors(data, sp, "minilm", "", 64, progress=True)
    rng = np.random.default_rng(0)
    return vecs[np.sort(rng.choice(len(vecs), min(n, len(vecs)), replace=False))]


def synthetic(base: np.ndarray, n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.35 / np.sqrt(base.shape[1]), (n, base.shape[1]))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    proj = rng.normal(0, 1 / np.sqrt(base.shape[1]), (base.shape[1], dim))
    learned = text @ proj + rng.normal(0, 0.3 / np.sqrt(dim), (n, dim))
    learned /= np.linalg.norm(learned, axis=1, keepdims=True)
    return np.concatenate([learned, text], axis=1).astype(np.float32)


def make_bundle(vectors: np.ndarray, dim: int):
    from crossrec.bundle import Bundle
    from crossrec.config import TrainConfig
    from crossrec.model import CrossRecModel

    cfg = TrainConfig(dim=dim, text_prior_decay=0.6, text_prior_cross=0.1, priors=[])
    torch.manual_seed(0)
    model = CrossRecModel(cfg, 1, in_dim=vectors.shape[1] - dim).eval()
    n = len(vectors)
    ids = [f"i{k:08d}" for k in range(n)]
    col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    items = {"synthetic": pa.table({"item_id": ids, "title": ids, "vector": col})}
    meta = {"version": f"synthetic-{n}", "domains": ["synthetic"], "in_dim": vectors.shape[1] - dim}
    return Bundle(
        path=Path(tempfile.gettempdir()), meta=meta, config=cfg, model=model, domains=["synthetic"], items=items
    )


def measure(n: int, base: np.ndarray, dim: int, requests: int, seed: int = 0) -> dict:
    from crossrec.recommender import HistoryItem, Recommender

    vectors = synthetic(base, n, dim, seed)
    bundle = make_bundle(vectors, dim)
    del vectors
    exact = Recommender(bundle, index="exact")
    ann = Recommender(bundle, index="exact")
    rng = np.random.default_rng(seed + 1)
    hists = [
        [HistoryItem("synthetic", f"i{k:08d}") for k in rng.integers(0, n, rng.integers(1, 11))]
        for _ in range(requests)
    ]
    # nprobe tuned as export tunes it: on held-aside users (not the measured ones).
    from crossrec.index import IvfIndex, tune_nprobe

    t0 = time.perf_counter()
    rows = ann.retriever.rows("synthetic").numpy()
    index = IvfIndex.build(rows, 16)
    build_s = time.perf_counter() - t0
    tune = [
        ann._users(*_hv(ann, [HistoryItem("synthetic", f"i{k:08d}") for k in rng.integers(0, n, 5)]))[0].numpy()
        for _ in range(64)
    ]
    nprobe, tune_recall = tune_nprobe(index, rows, np.stack(tune), ann.retriever.ann_candidates)
    ann.retriever.index["synthetic"] = index
    times: dict[str, list[float]] = {"exact": [], "ann": []}
    recall = []
    for h in hists[:10]:  # warm-up
        exact.recommend(h, "synthetic", k=10)
        ann.recommend(h, "synthetic", k=10)
    for h in hists:
        got = {}
        for name, rec in (("exact", exact), ("ann", ann)):
            t = time.perf_counter()
            got[name] = [x.item_id for x in rec.recommend(h, "synthetic", k=10)]
            times[name].append(1e3 * (time.perf_counter() - t))
        recall.append(len(set(got["ann"]) & set(got["exact"])) / max(1, len(got["exact"])))
    return {
        "items": n,
        "dim": int(dim + base.shape[1]),
        "recall_at_10": round(float(np.mean(recall)), 4),
        "p50_ms_ann": round(float(np.percentile(times["ann"], 50)), 2),
        "p99_ms_ann": round(float(np.percentile(times["ann"], 99)), 2),
        "p50_ms_exact": round(float(np.percentile(times["exact"], 50)), 2),
        "p99_ms_exact": round(float(np.percentile(times["exact"], 99)), 2),
        "build_s": round(build_s, 1),
        "nprobe": nprobe,
        "nlist": index.nlist,
        "tune_recall": round(tune_recall, 4),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "requests": requests,
    }


def _hv(rec, hist):
    hv, _ = rec._history(hist)
    return hv, hist, "synthetic", [None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[40_000, 300_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64, help="learned part of the item vector (the text part is 384)")
    ap.add_argument("--base", type=int, default=4096, help="real items the catalog is drawn around")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json", metavar="OUT", help="write the rows as JSON (and a plot OUT.png)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # a replica's one CPU
    base = base_vectors(a.base)
    rows = []
    print(
        "| items | recall@10 | p50 ms ANN | p99 ms ANN | p50 ms exact | p99 ms exact | build s | nprobe | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in a.items:
        r = measure(n, base, a.dim, a.requests)
        rows.append(r)
        print(
            f"| {n:,} | {r['recall_at_10']:.3f} | {r['p50_ms_ann']} | {r['p99_ms_ann']} | {r['p50_ms_exact']} | "
            f"{r['p99_ms_exact']} | {r['build_s']} | {r['nprobe']} | {r['rss_mb']:,} |",
            flush=True,
        )
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if a.json:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        n = [r["items"] for r in rows]
        for key, label in (("exact", "exact scan"), ("ann", "ANN (faiss IVF-Flat)")):
            ax.plot(n, [r[f"p50_ms_{key}"] for r in rows], marker="o", label=f"{label} p50")
            ax.plot(n, [r[f"p99_ms_{key}"] for r in rows], marker="x", linestyle="--", label=f"{label} p99")
        ax.set(xscale="log", yscale="log", xlabel="items in the domain", ylabel="ms per request (1 thread)")
        ax.legend(fontsize=8)
        ax.set_title("Recommender.recommend latency vs catalog size")
        fig.tight_layout()
        fig.savefig(Path(a.json).with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
