"""`crossrec prepare`: logs -> a prepared dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossrec_cli.options import add_quiet

__all__ = ["register"]


def cmd_prepare(args: argparse.Namespace) -> int:
    from crossrec.dataset import PrepareLimits, prepare

    limits = PrepareLimits(
        **{k: v for k, v in vars(args).items() if k in ("batch_rows", "partition_rows", "spill_dir") and v is not None}
    )
    man = prepare(
        args.sources,
        args.out,
        fmt=args.format,
        domain=args.domain,
        identity=args.identity,
        force=args.force,
        progress=not args.quiet,
        identity_canonical=[p for p in (args.identity_canonical or "").split(",") if p],
        limits=limits,
    )
    c = man["counts"]
    print(f"wrote {args.out}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions")
    for d, dc in c["domains"].items():
        print(f"  {d:<12} {dc['users']:>8,} users {dc['items']:>8,} items {dc['interactions']:>9,} interactions")
    ident = man["report"].get("identity")
    if ident:
        print(
            f"  identity: {ident['interactions_mapped']:,} interactions mapped, {ident['interactions_unmapped']:,} "
            f"not; {ident['users_on_2_or_more_platforms']:,} users on 2 or more platforms after the merge"
        )
    for what, n in {**man["skipped"], **{k: v for k, v in man["report"].items() if isinstance(v, int)}}.items():
        if n:
            print(f"  {what}: {n:,}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "prepare",
        help="turn logs into a prepared dataset (Parquet + manifest)",
        description="Read one or more sources, validate them, unify user identity, and write a "
        "prepared dataset folder atomically (nothing is left behind on failure).",
    )
    sp.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="a folder or file: items.csv + interactions.csv (or .parquet/.jsonl), RecBole/UniSRec "
        "atomic files, or Amazon Reviews 2023 JSONL",
    )
    sp.add_argument("--out", required=True, metavar="DATASET", help="folder to write")
    sp.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "parquet", "jsonl", "recbole", "amazon2023"],
        help="source format (default: detect)",
    )
    sp.add_argument("--domain", help="domain name for sources that carry none (e.g. one RecBole dataset)")
    sp.add_argument(
        "--identity",
        metavar="FILE",
        help="identity table (platform, platform_user_id, user_id) unifying users across platforms; users it "
        "does not list become PLATFORM:ID (never merged by accident) unless their platform is canonical",
    )
    sp.add_argument(
        "--identity-canonical",
        metavar="PLATFORM[,PLATFORM]",
        help="platforms whose user ids already are the unified ids: their users keep their id, so the identity "
        "table only needs to list the other platforms' users (a platform is the `platform` column, else the domain)",
    )
    sp.add_argument("--force", action="store_true", help="replace DATASET if it exists")
    sp.add_argument(
        "--batch-rows",
        type=int,
        metavar="N",
        help="interactions validated and spilled at a time (default 1048576); with --partition-rows, what bounds "
        "memory (the log itself may be larger than memory)",
    )
    sp.add_argument(
        "--partition-rows",
        type=int,
        metavar="N",
        help="interactions sorted at a time: one range of users (default 1048576)",
    )
    sp.add_argument(
        "--spill-dir",
        type=Path,
        metavar="DIR",
        help="where interactions are spilled while preparing (about the output's size again; default: beside the "
        "output); removed at the end",
    )
    add_quiet(sp)
    sp.set_defaults(func=cmd_prepare)
