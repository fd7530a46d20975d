"""Warm start on new logs: retrain from the old bundle (`crossrec train --init OLD`) vs from scratch.

A team retrains as logs grow: it has the bundle of an older snapshot and a newly prepared dataset. This bench makes
the older snapshot out of one prepared dataset (the cut exists only to measure; a user has both snapshots), trains
the old bundle on it, then trains the new snapshot twice with the commands a user runs (printed before they run):

    crossrec train --data NEW --out SCRATCH                 (from scratch)
    crossrec train --data NEW --out WARM --init OLD_BUNDLE  (warm start)

and writes OUT/result.json (test NDCG@10 per domain, wall time, epochs to the best validation epoch); `table` turns
result files into the Markdown table of docs/RESULTS.md "Warm start on new logs".

    python bench/warm_start.py run --data data/amazon-food-kitchen --out out/bench/warm-fk [--seeds 0,1 [--old-seed 0]]
    python bench/warm_start.py snapshot --data data/amazon-food-kitchen --out DIR   (the old snapshot's CSVs only)
    python bench/warm_start.py table out/bench/warm-*/result.json

The shared data's timestamps are ordinal (each user's order, no clock), so "the last days of logs" is each user's
last `--tail` interactions (default 1) plus every interaction of a seeded `--new-users` share of users (default
0.05: users who arrived after the cut). Items whose every interaction is in the new logs are left out of the old
catalog (listed after the cut): the new snapshot has new users and new items. Cutting a suffix of each history
keeps the new snapshot's test and validation targets out of the old bundle's training: a (user, domain)'s last
two interactions are either in the new logs or also the last two of the old snapshot (its own held-out targets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from crossrec.dataset import Dataset


def old_snapshot(data: str, out: Path, tail: int, new_users: float, seed: int) -> dict:
    """Writes OUT/items.csv and OUT/interactions.csv: `data` without its new logs (module docstring). Returns the
    counts of what the cut held out."""
    ds = Dataset.load(data)
    inters = ds.interactions
    users = inters.column("user_id").to_numpy(zero_copy_only=False)
    ts = inters.column("timestamp").to_numpy()
    # rank of each row from the end of its user's history (0 = the latest); ties broken by row order
    order = np.lexsort((np.arange(len(ts)), ts, users))
    uniq, first, counts = np.unique(users[order], return_index=True, return_counts=True)
    from_end = np.empty(len(ts), dtype=np.int64)
    pos = np.arange(len(ts)) - np.repeat(first, counts)
    from_end[order] = np.repeat(counts, counts) - 1 - pos
    # sha256 of (seed, user id): deterministic across runs and machines (Python's hash is salted)
    late = {
        u
        for u in uniq
        if int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") / 2**64 < new_users
    }
    is_late = np.fromiter((u in late for u in users), dtype=bool, count=len(users))
    keep = (from_end >= tail) & ~is_late
    old = inters.filter(pa.array(keep))
    seen = pc.unique(old.column("item_id"))
    ever = pc.unique(inters.column("item_id"))
    items = ds.items
    listed = pc.or_(pc.is_in(items.column("item_id"), seen), pc.invert(pc.is_in(items.column("item_id"), ever)))
    old_items = items.filter(listed)
    out.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(old_items, out / "items.csv")
    pcsv.write_csv(old, out / "interactions.csv")
    return {
        "tail": tail,
        "new_users": new_users,
        "seed": seed,
        "interactions": {"new": len(inters), "old": len(old)},
        "users": {"new": len(uniq), "old": len(uniq) - len(late), "arrived": len(late)},
        "items": {"new": len(items), "old": len(old_items), "listed_after_cut": len(items) - len(old_items)},
    }


def crossrec(argv: list[str]) -> float:
    """Runs one crossrec command as a user does (its own process); returns its wall time in seconds."""
    print("$ crossrec " + " ".join(argv), flush=True)
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "crossrec_cli", *argv])
    if rc:
        raise SystemExit(f"crossrec {argv[0]} failed with exit code {rc}")
    return round(time.time() - t0, 1)


def train(data: str, out: Path, extra: list[str]) -> dict:
    """`crossrec train` (skipped when OUT holds a finished run: its wall.json) and what the table needs from its
    bundle. bundle.json appears before the ranker stage ends (the retriever is published first), so it is no sign
    of a finished run."""
    if not (out / "wall.json").is_file():
        wall = crossrec(["train", "--data", data, "--out", str(out), *extra, "--quiet", "--force"])
        (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
    m = json.loads((out / "bundle.json").read_text())["metrics"]
    rj = out / "ranker" / "ranker.json"  # the second stage keeps its own metrics
    ranker = json.loads(rj.read_text())["metrics"] if rj.is_file() else None
    valid = [h.get("valid/ndcg@10") for h in m["history"]]
    best = m["history"][int(np.nanargmax([np.nan if v is None else v for v in valid]))]["epoch"] if valid else None
    return {
        "wall_s": json.loads((out / "wall.json").read_text())["wall_s"],
        "fit_s": m["time_s"].get("fit"),
        "epochs": len(valid),
        "best_epoch": best,
        "valid_ndcg@10": max(v for v in valid if v is not None) if valid else None,
        "test_ndcg@10": {d: v["ndcg@10"] for d, v in m["test"].items()},
        "ranked_test_ndcg@10": {d: v["ndcg@10"] for d, v in ranker["test"].items()} if ranker else None,
        "ranker_s": ranker.get("time_s") if ranker else None,  # lists, fit, ranked test evaluation
    }


def cmd_snapshot(a) -> int:
    print(json.dumps(old_snapshot(a.data, Path(a.out), a.tail, a.new_users, a.cut_seed), indent=1))
    return 0


def cmd_run(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = sum((["--set", s] for s in a.set), [])
    cut = old_snapshot(a.data, out / "old-src", a.tail, a.new_users, a.cut_seed)
    if not (out / "old" / "manifest.json").is_file():
        crossrec(["prepare", str(out / "old-src"), "--out", str(out / "old"), "--quiet"])
    result: dict = {"data": a.data, "cut": cut, "sets": a.set, "old_seed": a.old_seed, "runs": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        seeded = [*sets, "--set", f"seed={seed}"]
        old_seed = seed if a.old_seed is None else a.old_seed
        old = out / f"old-bundle-s{old_seed}"
        runs = {
            "old snapshot": train(str(out / "old"), old, [*sets, "--set", f"seed={old_seed}"]),
            "new, from scratch": train(a.data, out / f"scratch-s{seed}", seeded),
            "new, warm start": train(a.data, out / f"warm-s{seed}", [*seeded, "--init", str(old)]),
        }
        result["runs"][str(seed)] = runs
        (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'result.json'}")
    return cmd_table(argparse.Namespace(results=[str(out / "result.json")]))


def cmd_table(a) -> int:
    for path in a.results:
        r = json.loads(Path(path).read_text())
        c = r["cut"]
        print(
            f"\n{r['data']}: old snapshot {c['interactions']['old']:,} of {c['interactions']['new']:,} interactions, "
            f"{c['users']['arrived']:,} users and {c['items']['listed_after_cut']:,} items new in the new snapshot"
        )
        doms = None
        for seed, runs in r["runs"].items():
            for name, v in runs.items():
                if name == "old snapshot" and r.get("old_seed") is not None and seed != str(r["old_seed"]):
                    continue  # the one old bundle: listed with its own seed
                scores = v["ranked_test_ndcg@10"] or v["test_ndcg@10"]
                if doms is None:
                    doms = [d for d in scores if d != "all"]
                    print("| seed | run | " + " | ".join(doms) + " | epochs (best) | fit s | wall s |")
                    print("|---" * (len(doms) + 5) + "|")
                print(
                    f"| {seed} | {name} | "
                    + " | ".join(f"{scores[d]:.4f}" for d in doms)
                    + f" | {v['epochs']} ({v['best_epoch']}) | {v['fit_s']:.0f} | {v['wall_s']:.0f} |"
                )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name, fn in (("run", cmd_run), ("snapshot", cmd_snapshot)):
        sp = sub.add_parser(name)
        sp.add_argument("--data", required=True, help="the new snapshot: a prepared dataset")
        sp.add_argument("--out", required=True)
        sp.add_argument("--tail", type=int, default=1, help="each user's latest interactions held out as new logs")
        sp.add_argument("--new-users", type=float, default=0.05, help="share of users who arrive after the cut")
        sp.add_argument("--cut-seed", type=int, default=0, help="seed of the users who arrive after the cut")
        sp.set_defaults(fn=fn)
    run = sub.choices["run"]
    run.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    run.add_argument("--old-seed", type=int, help="train the old bundle once, with this seed (default: each seed)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="crossrec train --set, every run")
    tab = sub.add_parser("table")
    tab.add_argument("results", nargs="+")
    tab.set_defaults(fn=cmd_table)
    a = ap.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
