"""Quality with approximate retrieval forced on: test NDCG@10 (and Recall@10) per domain of a bundle evaluated with
the exact scan and with an ANN index over every domain, built and tuned as export builds it (crossrec.index,
`retrieval.index=ann`), each target's candidates rescored with the priors as a request is.

    .venv/bin/python bench/ann_quality.py BUNDLE DATASET [--max-targets 3000]

Prints a table (exact, ANN, ANN / exact) and the nprobe chosen per domain.
"""

from __future__ import annotations

import argparse
import time

from crossrec.bundle import load_bundle
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import bundle_retriever
from crossrec.splits import splits_for


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("dataset")
    ap.add_argument("--max-targets", type=int, default=3000, help="test targets per domain (0: all)")
    a = ap.parse_args()
    bundle, data = load_bundle(a.bundle), Dataset.load(a.dataset)
    splits = splits_for(data, bundle.config, training=True)
    retriever = bundle_retriever(bundle, data, splits)
    exact = evaluate(splits, retriever, split="test", ks=(10,), max_targets=a.max_targets)
    t0 = time.perf_counter()
    retriever.ann_candidates = bundle.config.retrieval.candidates
    recall = retriever.build_indexes(bundle.config.retrieval.nprobe, tune_on=256)
    build_s = time.perf_counter() - t0
    ann = evaluate(splits, retriever, split="test", ks=(10,), max_targets=a.max_targets)
    print(f"{a.bundle} on {a.dataset}: indexes built and tuned in {build_s:.1f} s")
    print(
        "| domain | items | nprobe (candidate recall) | NDCG@10 exact | NDCG@10 ANN | ANN / exact | R@10 exact | R@10 ANN |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d in [*splits.domains, "all"]:
        e, x = exact.metrics[d], ann.metrics[d]
        ratio = x["ndcg@10"] / e["ndcg@10"] if e["ndcg@10"] else float("nan")
        ix = retriever.index.get(d)
        probe = f"{ix.nprobe} ({recall.get(d, float('nan')):.3f})" if ix is not None else "-"
        n = f"{splits.n_items[d]:,}" if d in splits.n_items else "-"
        print(
            f"| {d} | {n} | {probe} | {e['ndcg@10']:.4f} | {x['ndcg@10']:.4f} | {ratio:.4f} | "
            f"{e['recall@10']:.4f} | {x['recall@10']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
