"""Compares crossrec's evaluation with the independent reference `../shared/tools/refeval.py`.

    python bench/check_refeval.py ../shared/data/amazon-food-kitchen ../shared/data/amazon-art-office

For each raw data folder: prepare it (in a temp dir), evaluate popularity with crossrec and with refeval,
and print both side by side with the largest absolute difference over every metric, domain and split.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from crossrec.baselines import Popularity
from crossrec.dataset import Dataset, prepare
from crossrec.evaluation import evaluate
from crossrec.splits import Splits


def load_refeval(path: Path):
    spec = importlib.util.spec_from_file_location("refeval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="raw data folders (items.csv + interactions.csv)")
    ap.add_argument("--refeval", default=str(Path(__file__).parents[1] / "../shared/tools/refeval.py"))
    a = ap.parse_args()
    ref = load_refeval(Path(a.refeval))
    worst = 0.0
    for folder in a.data:
        with tempfile.TemporaryDirectory() as tmp:
            prepare([folder], Path(tmp) / "ds", progress=False)
            t0 = time.time()
            sp = Splits(Dataset.load(Path(tmp) / "ds"))
            ours = {s: evaluate(sp, Popularity(sp), split=s) for s in ("test", "valid")}
            t1 = time.time()
        data = ref.load_data(folder)
        theirs = {s: ref.evaluate_scores(data, ref.popularity_score_fn(data), split=s) for s in ("test", "valid")}
        t2 = time.time()
        print(f"\n{folder}   (crossrec {t1 - t0:.1f}s, refeval {t2 - t1:.1f}s)")
        print(f"  {'split':<6}{'domain':<10}{'#targets':>9}  {'R@10 ours':>10}{'R@10 ref':>10}"
              f"{'N@10 ours':>10}{'N@10 ref':>10}  max|diff| over 9 metrics")
        for s in ("test", "valid"):
            for d in list(sp.domains) + ["all"]:
                mo, mr = ours[s].metrics[d], theirs[s]["metrics"][d]
                diff = max(abs(mo[k] - mr[k]) for k in mr)
                worst = max(worst, diff)
                assert ours[s].n_targets[d] == theirs[s]["n_targets"][d]
                print(f"  {s:<6}{d:<10}{ours[s].n_targets[d]:>9}  {mo['recall@10']:>10.5f}{mr['recall@10']:>10.5f}"
                      f"{mo['ndcg@10']:>10.5f}{mr['ndcg@10']:>10.5f}  {diff:.2e}")
    print(f"\nlargest difference: {worst:.2e} -> {'AGREE' if worst < 1e-9 else 'DIFFER'}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
