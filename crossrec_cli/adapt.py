"""`crossrec adapt`: a bundle plus domains its model never trained on, calibrated once on their logs."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossrec.calibration import MIN_TARGETS
from crossrec_cli.options import UsageError, add_bundle, add_data, add_quiet, csv_list

__all__ = ["register"]


def cmd_adapt(args: argparse.Namespace) -> int:
    from crossrec.adapt import adapt_bundle
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset

    domains = csv_list(args.domains) or []
    if not domains:
        raise UsageError("--domains: name at least one new domain, e.g. --domains office")
    if Path(args.out).resolve() == Path(args.bundle).resolve():
        raise UsageError("--out: write the adapted bundle to a new folder (the bundle it starts from is kept as it is)")
    if args.min_targets < 1:
        raise UsageError(f"--min-targets must be >= 1, got {args.min_targets}")
    bundle = load_bundle(args.bundle)
    data = Dataset.load(args.data)
    print(
        f"adapting {bundle.version} (trained on {', '.join(bundle.domains)}) to {', '.join(domains)}: "
        f"items embedded with {bundle.config.backbone}, calibrated on {args.data}'s validation targets"
    )
    res = adapt_bundle(
        bundle, data, domains, args.out, data_path=args.data, progress=not args.quiet, min_targets=args.min_targets
    )
    for d in res.domains:
        parts = " + ".join(res.uses[d])
        line = f"{d}: {res.n_train[d]} training interactions, {res.n_valid[d]} validation targets; scores with {parts}"
        if d in res.test:
            line += f"; test NDCG@10 {res.test[d]['ndcg@10']:.4f} ({res.test[d]['n_targets']} targets)"
        print(line)
    if res.params:
        print("chosen on validation: " + ", ".join(f"{k}={v}" for k, v in res.params.items()))
    for note in res.notes:
        print(note)
    print(f"wrote {res.path} in {res.time_s:.0f} s (serve it: crossrec serve --bundle {res.path})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "adapt",
        help="add domains the model never trained on to a bundle, calibrated on their logs (no training)",
        description="Write a new bundle that is BUNDLE plus the --domains of DATASET that its model never "
        "trained on: their items are embedded with the bundle's backbone, and what `crossrec evaluate` fits for "
        "a zero-shot domain is fitted once on the new domain's validation targets and stored: the text prior's "
        "recency decay and cross-domain weight, the learned part's weight, and every configured prior refitted "
        "on the dataset's training window (popularity; transitions into the new domain when its logs have them). "
        "`crossrec evaluate`, `crossrec recommend` and `crossrec serve` then answer in the new domain with "
        "nothing fitted at request time. A domain with fewer than --min-targets validation targets (none: no "
        "logs) gets text only: its items' text vectors with the bundle's text prior, no priors. The model's "
        "weights are not trained: use `crossrec train --init BUNDLE` for that.",
    )
    add_bundle(sp, help="the bundle to adapt (kept as it is)")
    add_data(sp)
    sp.add_argument(
        "--domains",
        required=True,
        metavar="NEW[,NEW]",
        help="the new domains (domains of DATASET the bundle's model never trained on)",
    )
    sp.add_argument("--out", required=True, metavar="BUNDLE", help="where to write the adapted bundle")
    sp.add_argument(
        "--min-targets",
        type=int,
        default=MIN_TARGETS,
        metavar="N",
        help="validation targets a new domain needs to be calibrated on; with fewer it gets text only "
        "(default: %(default)s: on fewer, the choice follows noise)",
    )
    add_quiet(sp)
    sp.set_defaults(func=cmd_adapt)
