"""Compares crossrec's evaluation with the independent reference `../shared/tools/refeval.py`.

    python bench/check_refeval.py ../shared/data/amazon-food-kitchen ../shared/data/amazon-art-office
    python bench/check_refeval.py --protocol cold-user ../shared/data/amazon-food-kitchen ../shared/data/amazon-art-office

For each raw data folder: prepare it (in a temp dir), evaluate popularity with crossrec and with refeval,
and print both side by side with the largest absolute difference over every metric, domain and split.

`--protocol cold-user`: refeval.py has no cold-user protocol, so its targets, hidden interactions and popularity
counts are derived here from refeval's loaded data (its sorted arrays) by `cold_user_reference`, written from
DESIGN.md's text and not from crossrec.splits; ranking and metrics are refeval's own `rank_targets` and
`metrics_from_ranks`.
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


def cold_user_reference(ref, data, split: str, fraction: float = 0.2, seed: int = 0) -> dict:
    """Popularity under the cold-user protocol on refeval's data: {"metrics": {domain|all: ...}, "n_targets": ...}."""
    import hashlib

    import numpy as np

    n_users = len(data.users)
    first_dom = data.dom[data.user_start[:-1]]  # rows are sorted by (user, timestamp, file row)
    hidden = np.zeros(len(data.u), bool)
    target = np.zeros(len(data.u), bool)
    for k in range(n_users):
        s, e = data.user_start[k], data.user_start[k + 1]
        if len(set(data.dom[s:e].tolist())) < 2:
            continue
        x = int.from_bytes(hashlib.sha256(f"{seed}:{data.users[k]}".encode()).digest()[:8], "big") / 2.0**64
        if x >= fraction or (x < fraction / 2) != (split == "valid"):
            continue
        seen = set()
        for j in range(s, e):
            if data.dom[j] != first_dom[k]:
                hidden[j] = True
                if data.dom[j] not in seen:
                    seen.add(data.dom[j])
                    target[j] = True
    # Hidden interactions of BOTH halves are out of training (validation and test users alike).
    both = np.zeros(len(data.u), bool)
    for k in range(n_users):
        s, e = data.user_start[k], data.user_start[k + 1]
        if len(set(data.dom[s:e].tolist())) < 2:
            continue
        x = int.from_bytes(hashlib.sha256(f"{seed}:{data.users[k]}".encode()).digest()[:8], "big") / 2.0**64
        if x < fraction:
            both[s:e] = data.dom[s:e] != first_dom[k]
    out, all_ranks = {"metrics": {}, "n_targets": {}}, []
    for d in data.domains:
        code, off, n = data.dom_code[d], data.domain_offset[d], data.n_items(d)
        m = ~both & (data.dom == code)
        pop = np.bincount(data.item[m] - off, minlength=n).astype(np.float64)
        js = np.flatnonzero(target & (data.dom == code))
        mr, mc = [], []
        for r, j in enumerate(js):
            h = data.history(j)
            hd = np.unique(h[(h >= off) & (h < off + n)]) - off
            mr += [r] * len(hd)
            mc += hd.tolist()
        ranks = (
            ref.rank_targets(np.broadcast_to(pop, (len(js), n)), data.item[js] - off, mr or None, mc or None)
            if len(js)
            else np.zeros(0)
        )
        out["metrics"][d], out["n_targets"][d] = ref.metrics_from_ranks(ranks), len(js)
        all_ranks.append(ranks)
    allr = np.concatenate(all_ranks)
    out["metrics"]["all"], out["n_targets"]["all"] = ref.metrics_from_ranks(allr), len(allr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="raw data folders (items.csv + interactions.csv)")
    ap.add_argument("--protocol", choices=["leave-one-out", "cold-user"], default="leave-one-out")
    ap.add_argument("--refeval", default=str(Path(__file__).parents[1] / "../shared/tools/refeval.py"))
    a = ap.parse_args()
    ref = load_refeval(Path(a.refeval))
    worst = 0.0
    for folder in a.data:
        with tempfile.TemporaryDirectory() as tmp:
            prepare([folder], Path(tmp) / "ds", progress=False)
            t0 = time.time()
            sp = Splits(Dataset.load(Path(tmp) / "ds"), protocol=a.protocol)
            ours = {s: evaluate(sp, Popularity(sp), split=s) for s in ("test", "valid")}
            t1 = time.time()
        data = ref.load_data(folder)
        if a.protocol == "cold-user":
            theirs = {s: cold_user_reference(ref, data, s) for s in ("test", "valid")}
        else:
            theirs = {s: ref.evaluate_scores(data, ref.popularity_score_fn(data), split=s) for s in ("test", "valid")}
        t2 = time.time()
        print(f"\n{folder}   (crossrec {t1 - t0:.1f}s, refeval {t2 - t1:.1f}s)")
        print(
            f"  {'split':<6}{'domain':<10}{'#targets':>9}  {'R@10 ours':>10}{'R@10 ref':>10}"
            f"{'N@10 ours':>10}{'N@10 ref':>10}  max|diff| over 9 metrics"
        )
        for s in ("test", "valid"):
            for d in list(sp.domains) + ["all"]:
                mo, mr = ours[s].metrics[d], theirs[s]["metrics"][d]
                if mr["recall@10"] is None or mo["recall@10"] is None:  # no targets (cold-user: a first domain)
                    assert mr["recall@10"] is mo["recall@10"] is None
                    continue
                diff = max(abs(mo[k] - mr[k]) for k in mr)
                worst = max(worst, diff)
                assert ours[s].n_targets[d] == theirs[s]["n_targets"][d]
                print(
                    f"  {s:<6}{d:<10}{ours[s].n_targets[d]:>9}  {mo['recall@10']:>10.5f}{mr['recall@10']:>10.5f}"
                    f"{mo['ndcg@10']:>10.5f}{mr['ndcg@10']:>10.5f}  {diff:.2e}"
                )
    print(f"\nlargest difference: {worst:.2e} -> {'AGREE' if worst < 1e-9 else 'DIFFER'}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
