"""The `crossrec` command line. Each subcommand prints a one-line reason and exits non-zero on bad input.

Commands that need Ray (train, tune, serve, submit) import `trainers` / `serving` when they run, so the
core library stays framework-free and `crossrec prepare` starts fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import crossrec
from crossrec.schema import DataError

__all__ = ["main", "build_parser"]

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "data"


class UsageError(ValueError):
    """Bad arguments: reported as one line, exit code 2."""


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


# -- prepare ---------------------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from crossrec.dataset import prepare

    man = prepare(args.sources, args.out, fmt=args.format, domain=args.domain, identity=args.identity,
                  force=args.force, progress=not args.quiet)
    c = man["counts"]
    print(f"wrote {args.out}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions")
    for d, dc in c["domains"].items():
        print(f"  {d:<12} {dc['users']:>8,} users {dc['items']:>8,} items {dc['interactions']:>9,} interactions")
    for what, n in {**man["skipped"], **{k: v for k, v in man["report"].items() if isinstance(v, int)}}.items():
        if n:
            print(f"  {what}: {n:,}")
    return 0


# -- evaluate --------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from crossrec.baselines import BASELINES
    from crossrec.dataset import Dataset
    from crossrec.evaluation import evaluate, format_table
    from crossrec.splits import Splits

    baselines = _csv_list(args.baselines) or ([] if args.bundle else ["popularity"])
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise UsageError(f"--baselines: unknown baseline {unknown[0]!r} (accepted: {', '.join(BASELINES)})")
    if args.bundle is None and not baselines:
        raise UsageError("nothing to evaluate: pass --bundle, --baselines, or both")
    if args.bundle is not None:
        raise UsageError("--bundle: evaluating a trained bundle needs `crossrec train` (not in this version); "
                         "evaluate baselines with --baselines")
    data = Dataset.load(args.data)
    splits = Splits(data, min_per_domain=args.min_per_domain)
    domains = _csv_list(args.domains)
    if domains:
        for d in domains:
            if d not in splits.domains:
                raise UsageError(f"--domains: unknown domain {d!r} (domains in {args.data}: "
                                 f"{', '.join(splits.domains)})")
    results = {}
    for name in baselines:
        scorer = BASELINES[name](splits)
        results[name] = evaluate(splits, scorer, split=args.split, domains=domains, progress=not args.quiet,
                                 desc=name, mask_history=not args.no_mask)
    print(format_table(results))
    if args.json:
        out = {"bundle": args.bundle, "dataset": str(args.data), "data_hash": data.content_hash,
               "protocol": {"split": args.split, "min_per_domain": args.min_per_domain,
                            "mask_history": not args.no_mask, "full_ranking": True,
                            "ties": "item id order"},
               "metrics": {m: r.metrics for m, r in results.items()},
               "n_targets": next(iter(results.values())).n_targets,
               "slices": {m: r.slices for m, r in results.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# -- demo ------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    src = VENDORED / args.dataset
    if not (src / "manifest.json").is_file():
        raise UsageError(f"vendored dataset {src} not found (this command runs from a crossrec checkout)")
    out = Path(args.out)
    data_dir = out / "data"
    print(f"== 1. prepare {src} -> {data_dir}")
    cmd_prepare(argparse.Namespace(sources=[str(src)], out=str(data_dir), format="parquet", domain=None,
                                   identity=None, force=True, quiet=args.quiet))
    print("\n== 2. evaluate baselines (full ranking, test split)")
    cmd_evaluate(argparse.Namespace(bundle=None, data=str(data_dir), baselines="popularity", domains=None,
                                    json=str(out / "eval.json"), split="test", min_per_domain=3, no_mask=False,
                                    quiet=args.quiet))
    return 0


# -- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossrec",
        description="LLM-enhanced cross-domain recommendation on Ray: prepare logs, train, tune, evaluate, serve.",
        epilog="Run `crossrec COMMAND --help` for a command's options. Data contract: see README.md.")
    p.add_argument("--version", action="version", version=f"crossrec {crossrec.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sp = sub.add_parser("prepare", help="turn logs into a prepared dataset (Parquet + manifest)",
                        description="Read one or more sources, validate them, unify user identity, and write a "
                                    "prepared dataset folder atomically (nothing is left behind on failure).")
    sp.add_argument("sources", nargs="+", metavar="SRC",
                    help="a folder or file: items.csv + interactions.csv (or .parquet/.jsonl), RecBole/UniSRec "
                         "atomic files, or Amazon Reviews 2023 JSONL")
    sp.add_argument("--out", required=True, metavar="DATASET", help="folder to write")
    sp.add_argument("--format", default="auto",
                    choices=["auto", "csv", "parquet", "jsonl", "recbole", "amazon2023"],
                    help="source format (default: detect)")
    sp.add_argument("--domain", help="domain name for sources that carry none (e.g. one RecBole dataset)")
    sp.add_argument("--identity", metavar="FILE",
                    help="identity table (platform, platform_user_id, user_id) unifying users across platforms")
    sp.add_argument("--force", action="store_true", help="replace DATASET if it exists")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("evaluate", help="full-ranking metrics per domain, beside baselines",
                        description="Rank every item of each target domain for each test target (leave-one-out "
                                    "per user and domain) and report Recall/NDCG/MRR@10/20/50 per domain and "
                                    "overall.")
    sp.add_argument("--bundle", help="a trained bundle (omit to evaluate baselines only)")
    sp.add_argument("--data", required=True, metavar="DATASET", help="a prepared dataset")
    sp.add_argument("--domains", help="comma-separated domains (default: all)")
    sp.add_argument("--baselines", help="comma-separated: popularity (default without --bundle: popularity)")
    sp.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    sp.add_argument("--split", default="test", choices=["test", "valid"], help="which targets (default: test)")
    sp.add_argument("--min-per-domain", type=int, default=3,
                    help="interactions a user needs in a domain to get targets there (default: 3)")
    sp.add_argument("--no-mask", action="store_true", help="keep history items as candidates")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("demo", help="prepare the vendored sample and evaluate it",
                        description="Run the product end to end on a dataset vendored in this repository.")
    sp.add_argument("--dataset", default="amazon-art-office", choices=["amazon-art-office", "amazon-food-kitchen"])
    sp.add_argument("--out", default="out/demo", help="working folder (default: out/demo)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, UsageError, ValueError, FileNotFoundError) as e:
        print(f"crossrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
