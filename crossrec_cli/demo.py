"""`crossrec demo`: prepare, train, evaluate, recommend and serve on a sample of the vendored data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crossrec_cli.options import RECOMMENDED, VENDORED, UsageError, sample_users

__all__ = ["register"]


def _serve_once(bundle: Path, body: dict) -> None:
    """Deploys the Serve app for `bundle`, answers `body` over HTTP, prints how to query it, shuts Serve down."""
    from serving.app import curl_line, serve_once
    from trainers.runtime import init_ray

    init_ray()
    url, answer = serve_once(bundle, body)
    print(f"POST {url}/v1/recommend -> model {answer['model']}")
    for it in answer["items"]:
        why = ", ".join(f"{x['item_id']} ({x['weight']:+.2f})" for x in it.get("reasons") or [])
        print(f"  {it['item_id']}  {it['score']:7.2f}  {it['title'][:70]}  <- {why}")
    print(f"to serve it until Ctrl-C: crossrec serve --bundle {bundle}")
    print(f"then query it: {curl_line('http://127.0.0.1:8000', body)}")


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    src = VENDORED / args.dataset
    if not (src / "manifest.json").is_file():
        raise UsageError(f"vendored dataset {src} not found (this command runs from a crossrec checkout)")
    out = Path(args.out)
    quiet = ["--quiet"] if args.quiet else []

    def run(*argv: str) -> None:
        print(f"\n$ crossrec {' '.join(argv)}", flush=True)
        if args.run([*argv]) != 0:
            raise UsageError(f"demo step `crossrec {argv[0]}` failed (see above)")

    print(f"== 1. prepare: {args.users} users of {src} (real data, vendored)")
    sample_users(src, out / "sample", args.users)
    run("prepare", str(out / "sample"), "--out", str(out / "data"), "--force", *quiet)
    print(
        "\n== 2. train (configs/recommended.yaml: cached MiniLM vectors + knowledge graph, then a ranker; "
        "2 Ray Train workers)"
    )
    run(
        "train",
        "--data",
        str(out / "data"),
        "--out",
        str(out / "bundle"),
        "--config",
        str(RECOMMENDED),
        "--set",
        f"epochs={args.epochs}",
        "--name",
        f"demo-{int(time.time())}",
        *quiet,
    )
    print("\n== 3. evaluate beside the baselines (full ranking, test split)")
    run(
        "evaluate",
        "--bundle",
        str(out / "bundle"),
        "--data",
        str(out / "data"),
        "--json",
        str(out / "eval.json"),
        *quiet,
    )
    print("\n== 4. recommend for one user")
    from crossrec.dataset import Dataset

    data = Dataset.load(out / "data")
    users = np.array(data.interactions.column("user_id").to_pylist())
    doms = np.array(data.interactions.column("domain").to_pylist())
    items = np.array(data.interactions.column("item_id").to_pylist())
    domains = sorted(set(doms.tolist()))
    # A user with history in several domains, to show cross-domain reasons.
    for u in dict.fromkeys(users.tolist()):
        m = users == u
        if len(set(doms[m].tolist())) > 1 and m.sum() >= 4:
            break
    hist = items[m][:-1][-6:]
    run(
        "recommend",
        "--bundle",
        str(out / "bundle"),
        "--domain",
        str(doms[m][-1]),
        "--history",
        ",".join(hist.tolist()),
        "--k",
        "5",
    )
    print("\n== 5. serve: the Ray Serve graph over HTTP on 127.0.0.1, one request, then shut down")
    _serve_once(
        out / "bundle",
        {
            "history": [{"item_id": i, "domain": d} for i, d in zip(hist, doms[m][:-1][-6:])],
            "domain": str(doms[m][-1]),
            "k": 3,
            "explain": True,
        },
    )
    print(
        f"\ndone: dataset {out / 'data'}, bundle {out / 'bundle'}, metrics {out / 'eval.json'}; "
        f"domains {', '.join(domains)}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "demo",
        help="prepare, train, evaluate and recommend on the vendored sample",
        description="Run the product end to end on real data vendored in this repository: "
        "prepare a sample of users, train with Ray Train (a few minutes on 2 cores), "
        "evaluate beside the baselines, recommend for one user, and answer one request "
        "over HTTP from the Ray Serve graph.",
    )
    sp.add_argument("--dataset", default="amazon-food-kitchen", choices=["amazon-food-kitchen", "amazon-art-office"])
    sp.add_argument("--users", type=int, default=3000, help="users in the sample (default: 3000)")
    sp.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    sp.add_argument("--out", default="out/demo", help="working folder (default: out/demo)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_demo)
