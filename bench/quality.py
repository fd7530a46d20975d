"""Quality table: crossrec (cached mode) beside popularity, textknn and SASRec, per domain, full ranking.

    python bench/quality.py --data data/amazon-art-office --out out/bench/ao [--config configs/recommended.yaml]
                            [--set epochs=8 ...]
    python bench/quality.py --data data/amazon-food-kitchen --out out/bench/fk --zero-shot data/amazon-art-office
    python bench/quality.py --data data/amazon-art-office --out out/bench/ao-transfer --transfer

Prints Recall@10 / NDCG@10 per domain, training time and peak memory (all Ray processes summed, sampled
every 0.5 s) per run, and writes everything to OUT/quality.json. --zero-shot OTHER evaluates the trained
bundle on a dataset whose domains it never saw. --transfer compares, per domain, a model trained on that
domain alone with one pre-trained on the other domains and fine-tuned on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil

from crossrec.baselines import BASELINES
from crossrec.bundle import load_bundle
from crossrec.config import RunSettings, TrainConfig, load_config
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import bundle_retriever, calibrate_zero_shot
from crossrec.splits import Splits


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def timed(fn):
    t0 = time.time()
    with PeakMemory() as mem:
        out = fn()
    return out, time.time() - t0, mem.peak / 2**30


def train(data: str, out: Path, cfg: TrainConfig, workers: int):
    from trainers.pipeline import train_bundle

    return timed(lambda: train_bundle(data, out, cfg, RunSettings(workers=workers, name=out.name), progress=False))


def table(title: str, results: dict, domains: list[str], costs: dict) -> str:
    lines = [
        title,
        f"  {'model':<26}"
        + "".join(f"{d + ' R@10':>15}{d + ' N@10':>15}" for d in domains)
        + f"{'train s':>10}{'peak GiB':>10}",
    ]
    for name, res in results.items():
        row = "".join(f"{res.metrics[d]['recall@10']:>15.4f}{res.metrics[d]['ndcg@10']:>15.4f}" for d in domains)
        t, m = costs.get(name, (None, None))
        row += f"{t:>10.0f}{m:>10.2f}" if t is not None else f"{'-':>10}{'-':>10}"
        lines.append(f"  {name:<26}" + row)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--config",
        help="crossrec's training config: recommended, basic or a YAML file (default: basic, TrainConfig's defaults; "
        "`crossrec train` without --config trains recommended)",
    )
    ap.add_argument("--set", action="append", default=[], help="config overrides for crossrec")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-sasrec", action="store_true")
    ap.add_argument("--sasrec-epochs", type=int, default=30, help="SASRec's epoch cap (early stopping inside)")
    ap.add_argument("--zero-shot", metavar="OTHER_DATASET")
    ap.add_argument("--transfer", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Dataset.load(a.data)
    splits = Splits(data)
    domains = splits.domains + ["all"]
    cfg = load_config(a.config, a.set)
    report: dict = {"data": a.data, "config_file": a.config, "config": a.set, "runs": {}}
    results, costs = {}, {}

    for name in ("popularity", "textknn"):
        results[name] = evaluate(splits, BASELINES[name](splits, data, cfg.backbone, cfg.text_template, cfg.max_tokens))
    if not a.no_sasrec:
        from trainers.baselines import sasrec_scorer

        scorer, t, m = timed(lambda: sasrec_scorer(a.data, data, splits, overrides={"epochs": a.sasrec_epochs}))
        results["sasrec"], costs["sasrec"] = evaluate(splits, scorer), (t, m)
    meta, t, m = train(a.data, out / "crossrec", cfg, a.workers)
    costs["crossrec"] = (t, m)
    bundle = load_bundle(out / "crossrec")
    retrieval = bundle_retriever(bundle, data, splits)
    if bundle.has_ranker:  # the pipeline is crossrec; its first stage alone is reported beside it
        from crossrec.ranker import RankedScorer, load_ranker

        results["crossrec-retrieval"] = evaluate(splits, retrieval)
        retrieval = RankedScorer(retrieval, load_ranker(bundle))
    results["crossrec"] = evaluate(splits, retrieval)
    print(table(f"\n{a.data} (test split, full ranking)", results, domains, costs))
    report["runs"]["main"] = {k: {"metrics": r.metrics, "cost_s_gib": costs.get(k)} for k, r in results.items()}

    if a.zero_shot:
        other = Dataset.load(a.zero_shot)
        osp = Splits(other)
        # Retrieval only: the ranker's features (popularity, graph) are fitted on the training dataset. The text
        # prior's weights and the learned part's are chosen on the other dataset's validation split, as
        # textknn's are (calibrate_zero_shot); the uncalibrated bundle is shown too.
        zero = bundle_retriever(load_bundle(out / "crossrec"), other, osp)
        zres = {"crossrec zero-shot, as trained": evaluate(osp, zero)}
        report["zero_shot_calibration"] = calibrate_zero_shot(zero)
        zres["crossrec zero-shot"] = evaluate(osp, zero)
        for name in ("popularity", "textknn"):
            zres[name] = evaluate(osp, BASELINES[name](osp, other, cfg.backbone, cfg.text_template, cfg.max_tokens))
        print(table(f"\nzero-shot on {a.zero_shot} (trained on {a.data})", zres, osp.domains + ["all"], {}))
        report["runs"]["zero_shot"] = {k: r.metrics for k, r in zres.items()}

    if a.transfer:
        tres, tcost = {}, {}
        for d in splits.domains:
            others = [x for x in splits.domains if x != d]
            only = load_config(a.config, [*a.set, f"train_domains=[{d}]"])
            _, t1, m1 = train(a.data, out / f"only-{d}", only, a.workers)
            pre = load_config(a.config, [*a.set, f"train_domains=[{','.join(others)}]"])
            _, t2, m2 = train(a.data, out / f"pre-{d}", pre, a.workers)
            ft = load_config(a.config, [*a.set, f"train_domains=[{d}]", f"init_from={out / f'pre-{d}'}"])
            _, t3, m3 = train(a.data, out / f"ft-{d}", ft, a.workers)
            for label, b, cost in (
                (f"{d}: target only", f"only-{d}", (t1, m1)),
                (f"{d}: zero-shot (pre only)", f"pre-{d}", (t2, m2)),
                (f"{d}: pre + fine-tune", f"ft-{d}", (t3, max(m2, m3))),
            ):
                tres[label] = evaluate(splits, bundle_retriever(load_bundle(out / b), data, splits), domains=[d])
                tcost[label] = cost
            print(table(f"\ntransfer to {d}", {k: v for k, v in tres.items() if k.startswith(d)}, [d], tcost))
        report["runs"]["transfer"] = {k: {"metrics": r.metrics, "cost_s_gib": tcost[k]} for k, r in tres.items()}

    (out / "quality.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
