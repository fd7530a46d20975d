"""`crossrec adapt` with 0, 100, 1,000 and all of a new domain's interactions: a table of test NDCG@10 in the new
domain, evaluated on the full dataset with nothing calibrated at evaluation, beside textknn and the zero-shot
calibration `crossrec evaluate` does for a bundle that never saw the domain.

    crossrec prepare ../shared/data/amazon-food-kitchen ../shared/data/amazon-art-office --out out/pool4
    crossrec train --data out/pool4 --out out/bench/adapt/base --config basic --set epochs=4 \
        --train-domains arts,food,kitchen
    python bench/adapt.py --pool out/pool4 --bundle out/bench/adapt/base --domain office --out out/bench/adapt \
        --counts 0,100,1000,3000,10000,all  [--min-targets N: passed to crossrec adapt]

For a count k, the adapt dataset is the pool with the new domain's interactions of a seeded random sample of its
users only (whole users, until their interactions reach k; every item kept): the new domain's first users. Its
other domains are kept (their users' histories lead into the new domain when they have it). Every row is evaluated
on the same test targets: the full pool's, in the new domain (the users adapt saw hold out their last interaction
there as in any split). Runs the same commands a user runs (printed before they run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crossrec_cli import main as crossrec


def run(argv: list[str]) -> float:
    print("$ crossrec " + " ".join(argv), flush=True)
    t0 = time.time()
    rc = crossrec(argv)
    if rc:
        raise SystemExit(f"crossrec {argv[0]} failed with exit code {rc}")
    return round(time.time() - t0, 1)


def subset(pool: Path, domain: str, k: int, out: Path, seed: int) -> Path:
    """The pool with `domain`'s interactions of whole sampled users until they reach k (prepared at out)."""
    if (out / "manifest.json").is_file():
        return out
    inter = pq.read_table(pool / "interactions.parquet")
    dom = pc.equal(inter.column("domain"), domain)
    new = inter.filter(dom)
    users, counts = np.unique(np.asarray(new.column("user_id").to_pylist(), dtype=object), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(users))
    take = order[: int(np.searchsorted(np.cumsum(counts[order]), k)) + 1] if k else order[:0]
    keep = pc.or_(pc.invert(dom), pc.is_in(inter.column("user_id"), value_set=pc.cast(users[take].tolist(), "string")))
    src = out.with_name(out.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    pq.write_table(inter.filter(keep), src / "interactions.parquet")
    pq.write_table(pq.read_table(pool / "items.parquet"), src / "items.parquet")
    from crossrec.dataset import prepare

    prepare([src], out, progress=False, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--bundle", required=True, help="trained without --domain (e.g. --train-domains the others)")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--counts", default="0,100,1000,all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-targets", type=int, default=None, help="passed to crossrec adapt (default: its own)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out, d = Path(a.out), a.domain
    out.mkdir(parents=True, exist_ok=True)
    ref = out / "zero-shot.json"
    if not ref.is_file():  # textknn, popularity and the bundle calibrated at evaluation (the earlier zero-shot)
        run(["evaluate", "--bundle", a.bundle, "--data", a.pool, "--domains", d, "--json", str(ref), "--quiet"])
    refm = json.loads(ref.read_text())["metrics"]
    rows = []
    for c in a.counts.split(","):
        data = a.pool if c == "all" else str(subset(Path(a.pool), d, int(c), out / f"data-{c}", a.seed))
        b2 = out / f"adapted-{c}"
        t = None
        if not (b2 / "bundle.json").is_file():
            extra = [] if a.min_targets is None else ["--min-targets", str(a.min_targets)]
            t = run(
                ["adapt", "--bundle", a.bundle, "--data", data, "--domains", d, "--out", str(b2), "--quiet", *extra]
            )
        ev = out / f"eval-{c}.json"
        if not ev.is_file():
            run(
                [
                    "evaluate",
                    "--bundle",
                    str(b2),
                    "--data",
                    a.pool,
                    "--domains",
                    d,
                    "--baselines",
                    "",
                    "--json",
                    str(ev),
                ]
                + ["--quiet"]
            )
        entry = json.loads((b2 / "bundle.json").read_text())["adapted"][d]
        got = json.loads(ev.read_text())["metrics"]["crossrec"][d]["ndcg@10"]
        rows.append(
            {
                "count": c,
                "n_train": entry["n_train_interactions"],
                "n_valid": entry["n_valid_targets"],
                "uses": " + ".join(entry["uses"]),
                "calibration": entry["calibration"],
                "adapt_s": t,
                "ndcg@10": got,
            }
        )
        (out / "result.json").write_text(json.dumps({"reference": refm, "rows": rows}, indent=1) + "\n")
    knn = refm["textknn"][d]["ndcg@10"]
    print(
        f"\n{d}: test NDCG@10 on {a.pool} (textknn {knn:.4f}, popularity {refm['popularity'][d]['ndcg@10']:.4f}, "
        f"zero-shot calibrated at evaluation {refm['crossrec'][d]['ndcg@10']:.4f}, as trained "
        f"{refm.get('crossrec-as-trained', {}).get(d, {}).get('ndcg@10', float('nan')):.4f})"
    )
    print(
        "| interactions given | training interactions | validation targets | scores with | learned weight | adapt (s) | test NDCG@10 | vs textknn |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['count']} | {r['n_train']:,} | {r['n_valid']:,} | {r['uses']} | {r['calibration']['learned_weight']} | "
            f"{r['adapt_s'] if r['adapt_s'] is not None else '-'} | {r['ndcg@10']:.4f} | {r['ndcg@10'] / knn:.2f}x |"
        )


if __name__ == "__main__":
    main()
