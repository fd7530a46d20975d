"""`crossrec evaluate`: full-ranking metrics per domain, for a bundle beside the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crossrec_cli.options import UsageError, add_bundle, add_data, add_quiet, add_ray_address, csv_list

__all__ = ["register"]


def _baseline_scorers(
    names: list[str], splits, data, text_cfg, backbone: str, args, domains: list[str] | None = None
) -> dict:
    from crossrec.baselines import BASELINES

    out = {}
    for name in names:
        if name == "sasrec":
            from trainers.baselines import sasrec_scorer  # trains with Ray Train (cached per dataset + config)

            out[name] = sasrec_scorer(
                args.data, data, splits, address=getattr(args, "address", None), progress=not args.quiet
            )
        else:
            out[name] = BASELINES[name](
                splits,
                data,
                backbone,
                text_cfg.text_template,
                text_cfg.max_tokens,
                progress=not args.quiet,
                domains=domains,
            )
    return out


def _baseline_names(args: argparse.Namespace) -> list[str]:
    """--baselines checked against the known ones (default: popularity, plus textknn beside a bundle)."""
    from crossrec.baselines import BASELINES

    accepted = [*BASELINES, "sasrec"]
    baselines = csv_list(args.baselines)
    if baselines is None:
        baselines = ["popularity", "textknn"] if args.bundle else ["popularity"]
    unknown = [b for b in baselines if b not in accepted]
    if unknown:
        raise UsageError(f"--baselines: unknown baseline {unknown[0]!r} (accepted: {', '.join(accepted)})")
    if args.bundle is None and not baselines:
        raise UsageError("nothing to evaluate: pass --bundle, --baselines, or both")
    return baselines


def _bundle_retrievers(bundle, data, splits, domains: list[str] | None, args: argparse.Namespace) -> dict:
    """The bundle's scorers: `crossrec` (the full pipeline: ranker over retrieval when the bundle has one),
    `crossrec-retrieval` beside a ranker, and on a dataset it never saw both the calibrated model and the model
    `crossrec-as-trained` (calibration is fitted on validation; --as-trained keeps the model as trained only)."""
    from crossrec.inference import bundle_retriever, calibrate_zero_shot

    scorers = {}
    evaluated = domains or splits.domains
    adapted = [d for d in evaluated if d in bundle.adapted]
    if adapted:
        verb = "carries its" if len(adapted) == 1 else "carry their"
        print(f"adapted: {', '.join(adapted)} {verb} calibration and priors (crossrec adapt): none is fitted here")
    unseen = [d for d in evaluated if d not in bundle.catalog_domains]
    if unseen:
        print(
            f"zero-shot: the bundle never trained on {', '.join(unseen)}; their items are embedded from "
            f"text with {bundle.config.backbone}"
        )
    scorers["crossrec"] = bundle_retriever(bundle, data, splits, progress=not args.quiet, domains=evaluated)
    if (
        unseen and unseen == evaluated and not args.as_trained
    ):  # a whole new dataset: calibrated on its validation split
        import copy

        as_trained = scorers["crossrec"]
        scorers["crossrec"] = copy.copy(as_trained)  # calibration sets its own priors and calibration
        calibrate_zero_shot(scorers["crossrec"], evaluated)
        scorers["crossrec-as-trained"] = as_trained
    if bundle.has_ranker:  # the full pipeline is `crossrec`; retrieval alone is reported beside it
        from crossrec.ranker import RankedScorer, load_ranker

        scorers["crossrec-retrieval"] = scorers["crossrec"]
        scorers["crossrec"] = RankedScorer(scorers["crossrec-retrieval"], load_ranker(bundle))
        if "crossrec-as-trained" in scorers:
            scorers["crossrec-as-trained"] = RankedScorer(scorers["crossrec-as-trained"], load_ranker(bundle))
    return scorers


def _write_json(
    args: argparse.Namespace, data, splits, bundle, domains, results: dict, params: dict, beyond: dict
) -> None:
    """The `--json` document (DESIGN.md "CLI contract")."""
    out = {
        "bundle": args.bundle,
        "dataset": str(args.data),
        "data_hash": data.content_hash,
        "protocol": {
            **splits.protocol_info,
            "split": args.split,
            "min_per_domain": args.min_per_domain,
            "mask_history": not args.no_mask,
            "full_ranking": True,
            "ties": "item id order",
        },
        "metrics": {m: r.metrics for m, r in results.items()},
        "params": params,
        "n_targets": next(iter(results.values())).n_targets,
        "slices": {m: r.slices for m, r in results.items()},
        "beyond_accuracy": beyond,
    }
    if bundle is not None:
        out["bundle_version"] = bundle.version
        out["zero_shot_domains"] = [d for d in (domains or splits.domains) if d not in bundle.catalog_domains]
        out["adapted_domains"] = [d for d in (domains or splits.domains) if d in bundle.adapted]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.evaluation import beyond_accuracy, evaluate, format_beyond, format_slices, format_table
    from crossrec.progress import interactive

    baselines = _baseline_names(args)
    bundle = None
    if args.bundle is not None:
        from crossrec.bundle import load_bundle

        bundle = load_bundle(args.bundle)
    data = Dataset.load(args.data)
    splits = _protocol_splits(data, bundle, args)
    domains = csv_list(args.domains)
    for d in domains or []:
        if d not in splits.domains:
            raise UsageError(f"--domains: unknown domain {d!r} (domains in {args.data}: {', '.join(splits.domains)})")
    scorers = {} if bundle is None else _bundle_retrievers(bundle, data, splits, domains, args)
    # Text baselines (textknn) use the bundle's backbone, template and truncation, else the training defaults;
    # --backbone overrides the backbone.
    text_cfg = bundle.config if bundle is not None else TrainConfig()
    backbone = args.backbone or text_cfg.backbone
    # Baselines are fitted on the validation targets of the evaluated domains, as the model is calibrated.
    scorers.update(_baseline_scorers(baselines, splits, data, text_cfg, backbone, args, domains))
    params = {name: s.params for name, s in scorers.items() if getattr(s, "params", None)}
    for name, p in params.items():
        print(f"{name}: {', '.join(f'{k}={v}' for k, v in p.items())} (chosen on the validation split)")
    # tqdm's bars at a terminal only: in a log they are a wall of carriage returns (the table follows anyway).
    results = {
        name: evaluate(
            splits,
            scorer,
            split=args.split,
            domains=domains,
            progress=not args.quiet and interactive(),
            desc=name,
            mask_history=not args.no_mask,
        )
        for name, scorer in scorers.items()
    }
    print(format_table(results))
    # Beyond accuracy and the cold-start slices: who gets served, not only how well (a second scoring pass).
    beyond = {
        name: beyond_accuracy(splits, scorer, split=args.split, domains=domains, mask_history=not args.no_mask)
        for name, scorer in scorers.items()
    }
    print("\n" + format_slices(results))
    print("\n" + format_beyond(beyond))
    if args.plot:
        from crossrec.plots import plot_evaluation

        plot_evaluation(
            {m: r.metrics for m, r in results.items()},
            args.plot,
            beyond=beyond,
            title=f"{Path(args.data).name}, {args.split} split, full ranking"
            + (f": {bundle.version}" if bundle is not None else ""),
        )
        print(f"wrote {args.plot}")
    if args.json:
        _write_json(args, data, splits, bundle, domains, results, params, beyond)
    return 0


def _protocol_splits(data, bundle, args):
    """The evaluation splits: `--protocol` (default: the bundle's, else leave-one-out). A bundle is refused under
    another protocol than the one it trained under: it has seen that protocol's targets in training."""
    from crossrec.splits import Splits, protocol_info

    trained = bundle.config if bundle is not None else None
    protocol = args.protocol or (trained.protocol if trained else "leave-one-out")
    fraction = args.cold_fraction if args.cold_fraction is not None else (trained.cold_fraction if trained else 0.2)
    seed = args.cold_seed if args.cold_seed is not None else (trained.cold_seed if trained else 0)
    try:
        splits = Splits(
            data, min_per_domain=args.min_per_domain, protocol=protocol, cold_fraction=fraction, cold_seed=seed
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if trained is not None:
        want = protocol_info(trained.protocol, trained.min_per_domain, trained.cold_fraction, trained.cold_seed)
        if want != splits.protocol_info:

            def show(p: dict) -> str:
                return ", ".join(f"{k}={v}" for k, v in p.items())

            raise UsageError(
                f"--protocol: the bundle was trained under {show(want)} and would be evaluated under "
                f"{show(splits.protocol_info)}, whose targets it has seen in training; train a bundle "
                f"with that protocol (crossrec train --protocol {protocol})"
            )
    return splits


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "evaluate",
        help="full-ranking metrics per domain, beside baselines",
        description="Rank every item of each target domain for each test target (leave-one-out "
        "per user and domain) and report Recall/NDCG/MRR@10/20/50 per domain and "
        "overall.",
    )
    add_bundle(sp, required=False, help="a trained bundle (omit to evaluate baselines only)")
    add_data(sp)
    sp.add_argument("--domains", help="comma-separated domains (default: all)")
    sp.add_argument(
        "--baselines",
        help="comma-separated: popularity, textknn, sasrec (trained with Ray Train) "
        "(default: popularity,textknn with --bundle, else popularity)",
    )
    add_ray_address(sp, " for baselines that train (sasrec)")
    sp.add_argument(
        "--backbone",
        help="backbone of text baselines (textknn): a registry name or a local model "
        "directory (default: the bundle's backbone, else minilm)",
    )
    sp.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    sp.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw per-domain NDCG@10, Recall@10, coverage@10 and popular share@10 of every model side by side",
    )
    sp.add_argument("--split", default="test", choices=["test", "valid"], help="which targets (default: test)")
    sp.add_argument(
        "--min-per-domain",
        type=int,
        default=3,
        help="interactions a user needs in a domain to get targets there (default: 3)",
    )
    sp.add_argument("--no-mask", action="store_true", help="keep history items as candidates")
    sp.add_argument(
        "--protocol",
        choices=["leave-one-out", "cold-user"],
        help="leave-one-out: the last interaction per (user, domain) is test; cold-user: held-out "
        "multi-domain users' first interaction in each domain but their first one, with only "
        "other domains as history (default: the bundle's protocol, else leave-one-out; a bundle "
        "trained under another protocol is refused)",
    )
    sp.add_argument(
        "--cold-fraction",
        type=float,
        help="cold-user: share of multi-domain users held out (default: the bundle's, else 0.2)",
    )
    sp.add_argument(
        "--cold-seed", type=int, help="cold-user: seed of the held-out users' hash (default: the bundle's, else 0)"
    )
    sp.add_argument(
        "--as-trained",
        action="store_true",
        help="zero-shot (no evaluated domain in the bundle): keep the bundle as trained instead of "
        "choosing its text-prior decay, cross-domain weight and learned-part weight on this "
        "dataset's validation split, as the textknn baseline's are",
    )
    add_quiet(sp)
    sp.set_defaults(func=cmd_evaluate)
