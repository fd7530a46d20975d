"""`crossrec train` and `crossrec tune`: Ray Train fits and Ray Tune sweeps that write bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossrec_cli.options import UsageError, add_data, add_quiet, add_ray_address, users_slice

__all__ = ["register"]


def cmd_train(args: argparse.Namespace) -> int:
    from crossrec.config import RunSettings, default_config, load_config

    overrides = list(args.set or [])
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.train_domains:
        overrides.append(f"train_domains=[{args.train_domains}]")
    if args.init:
        overrides.append(f"init_from={args.init}")
    if args.protocol:
        overrides.append(f"protocol={args.protocol}")
    if args.cold_fraction is not None:
        overrides.append(f"cold_fraction={args.cold_fraction}")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
    else:  # `recommended`, or `basic` + the ranker where it does not apply (said in one line)
        cfg, note = default_config(overrides, _init_config(overrides))
        if note:
            print(f"crossrec train: {note}", flush=True)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if cfg.strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError(
                "`strategy` deepspeed needs DeepSpeed: .venv/bin/pip install --no-build-isolation "
                "deepspeed==0.19.8 (see README), or use `strategy` ddp"
            )
    run = RunSettings(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        address=args.address,
        storage_path=args.storage,
        name=args.name,
    )
    from crossrec.dataset import Dataset

    data = Dataset.load(args.data)  # fail fast, before Ray starts, on a bad --data
    _check_out(args, data.content_hash)
    from trainers.pipeline import train_bundle

    resume_from = args.resume if isinstance(args.resume, str) else None
    meta = train_bundle(
        args.data,
        args.out,
        cfg,
        run,
        resume_from=resume_from,
        progress=not args.quiet,
        resume=args.resume is True,
        force=args.force,
    )
    m = meta["metrics"]
    print(
        f"\nwrote bundle {args.out} (version {meta['version']}); fit {m['time_s']['fit']:.0f}s, "
        f"embedding {m['time_s']['embed']:.0f}s"
    )
    print(f"  {'test':<10}{'targets':>9}{'R@10':>9}{'N@10':>9}{'MRR@10':>9}")
    for d, v in m["test"].items():
        print(f"  {d:<10}{m['n_targets'][d]:>9}{_row(v)}")
    if "ranker" in meta:
        r = meta["ranker"]
        print(f"  with the ranker (top-{cfg.ranker.top_n} re-ranked; fit {r['time_s']['fit']:.0f}s):")
        for d, v in r["test"].items():
            print(f"  {d:<10}{r['n_targets'][d]:>9}{_row(v)}")
    print(f"compare with baselines: crossrec evaluate --bundle {args.out} --data {args.data}")
    return 0


def _init_config(overrides: list[str]) -> dict | None:
    """The saved config of the bundle that `init_from` (--init or --set) names, or None without a warm start."""
    from crossrec.bundle import bundle_meta
    from crossrec.config import apply_overrides

    init = apply_overrides({}, overrides).get("init_from")
    return bundle_meta(Path(str(init)).expanduser(), "`init_from`")["config"] if init else None


def _row(v: dict) -> str:
    """R@10, N@10, MRR@10 columns; '-' for a domain without targets (cold-user: the domain users start in)."""
    return "".join(f"{v[k]:>9.4f}" if v[k] is not None else f"{'-':>9}" for k in ("recall@10", "ndcg@10", "mrr@10"))


def _check_out(args: argparse.Namespace, data_hash: str) -> None:
    """An existing --out is replaced only when --resume or --force says so."""
    from pathlib import Path

    out = Path(args.out)
    if args.resume or args.force or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    what = ""
    try:
        from crossrec.bundle import bundle_meta

        old = bundle_meta(out).get("data_hash")
        what = (
            " (a bundle of the same data)"
            if old == data_hash
            else f" (a bundle of other data: hash {str(old)[:8]} -> {data_hash[:8]})"
        )
    except (ValueError, FileNotFoundError, OSError):
        pass
    raise UsageError(f"--out {out} already exists{what}: pass --resume to continue its run, or --force to replace it")


def cmd_tune(args: argparse.Namespace) -> int:
    from crossrec.dataset import Dataset
    from crossrec.sweep import load_sweep

    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    sweep = load_sweep(args.sweep, num_samples=args.trials)
    Dataset.load(args.data)  # fail fast, before Ray starts, on a bad --data
    data = args.data
    if args.users is not None:  # a laptop-sized slice, made once in the sweep folder
        data = users_slice(args.data, Path(args.out) / "data", args.users)
        print(f"slice: {args.users} users of {args.data} -> {data}", flush=True)
    from trainers.tune import run_sweep  # imports Ray

    res = run_sweep(sweep, data, args.out, address=args.address, resume=args.resume, progress=not args.quiet)
    if args.quiet:
        from crossrec.sweep import format_trial_table

        print(format_trial_table(res.records, sweep.metric, sweep.mode))
    early = sum(r.status == "stopped early" for r in res.records)
    print(
        f"\n{len(res.records)} trials in {res.wall_s:.0f}s ({early} stopped early); table {res.out / 'trials.csv'}, "
        f"plot {res.out / 'sweep.png'}"
    )
    if res.interrupted:
        print(
            f"crossrec tune: interrupted; continue with: crossrec tune {args.sweep} --data {args.data} "
            f"--out {args.out}{f' --trials {args.trials}' if args.trials else ''}"
            f"{f' --users {args.users}' if args.users else ''} --resume",
            file=sys.stderr,
        )
        return 130
    if res.best is None:
        print("crossrec tune: error: no trial reported a metric (see the trials' errors above)", file=sys.stderr)
        return 1
    b = res.best.best(sweep.metric, sweep.mode)
    params = ", ".join(f"{k}={v}" for k, v in res.best.params.items())
    print(f"best: trial {res.best.trial_id} ({params}) {sweep.metric} {b[sweep.metric]:.4f} at epoch {b['epoch']}")
    test = res.bundle["metrics"]["test"]["all"]
    print(
        f"wrote bundle {res.out / 'best'}: test ndcg@10 {test['ndcg@10']:.4f}, recall@10 {test['recall@10']:.4f}; "
        f"compare with baselines: crossrec evaluate --bundle {res.out / 'best'} --data {data}"
    )
    return 0


class _HelpConfig(argparse.Action):
    """`--help-config`: prints every settable config key, its default and its doc (from TrainConfig's field
    metadata), then exits, like --help (before the required options are checked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from crossrec.config import DEFAULT_CONFIG, NAMED_CONFIGS, config_help

        rows = config_help()
        width = max(len(k) + len(d) for k, d, _ in rows) + 3
        default = _flat(NAMED_CONFIGS[DEFAULT_CONFIG])
        print(
            "config keys (--set KEY=VALUE, or a --config YAML file; dotted keys are sections); the values are "
            f"TrainConfig's defaults (`--config basic`), [{DEFAULT_CONFIG}: V] where the default "
            f"`--config {DEFAULT_CONFIG}` differs:"
        )
        for key, value, doc in rows:
            differs = f"  [{DEFAULT_CONFIG}: {_yaml_scalar(default[key])}]" if key in default else ""
            print(f"  {f'{key} = {value}':<{width}}  {doc}{differs}")
        parser.exit()


def _flat(data: dict, prefix: str = "") -> dict:
    """{"graph": {"enabled": True}} -> {"graph.enabled": True}."""
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _yaml_scalar(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "train",
        help="train the cross-domain recommender with Ray Train; writes a bundle",
        description="Train the two-tower model (item adaptor over backbone text vectors + causal "
        "user tower) on all domains with Ray Train (DDP over gloo on CPUs), report "
        "validation NDCG@10 each epoch, keep the best checkpoint, evaluate the test "
        "split, and export a bundle. Re-running the same run (--name) continues it; "
        "other data or config exits 2 unless --force. Without --config it trains `recommended`: "
        "text + knowledge-graph item vectors (attention fusion), then a second-stage ranker.",
    )
    add_data(sp)
    sp.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder to write")
    sp.add_argument(
        "--config",
        metavar="NAME|FILE.yaml",
        help="training config: `recommended` (the default: cached text vectors fused with knowledge-graph vectors "
        "by attention, 14 epochs, then the ranker; the pipeline docs/RESULTS.md measures; configs/recommended.yaml), "
        "`basic` (TrainConfig's defaults: text vectors only, no graph, no ranker), or a YAML file of "
        "crossrec.config.TrainConfig keys. Without --config, where `recommended` does not apply (--mode end-to-end, "
        "item_encoder=id, --init from a bundle without graph vectors) training uses `basic` + the ranker and says so",
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections (lr=3e-4, lora.rank=16); repeatable; "
        "--help-config lists the keys",
    )
    sp.add_argument(
        "--help-config", action=_HelpConfig, help="list every config key with its default and what it means, then exit"
    )
    sp.add_argument(
        "--train-domains",
        metavar="A,B",
        help="train on these domains only: the other domains' items and interactions never reach "
        "training, neither as targets nor inside histories, nor in the catalog, graph, text-prior "
        "fit, validation or ranker (true zero-shot for them; transfer pre-training)",
    )
    sp.add_argument(
        "--protocol",
        choices=["leave-one-out", "cold-user"],
        help="split protocol (default: leave-one-out): cold-user holds out a seeded share of the "
        "multi-domain users and hides all their interactions in every domain but their first "
        "one; evaluate such a bundle with `crossrec evaluate --protocol cold-user`",
    )
    sp.add_argument(
        "--cold-fraction", type=float, help="cold-user: share of multi-domain users held out (default: 0.2)"
    )
    sp.add_argument(
        "--init",
        metavar="BUNDLE",
        help="start from a bundle (fine-tuning after pre-training); "
        "with --set finetune=adaptor only the adaptor trains",
    )
    sp.add_argument("--mode", choices=["cached", "end-to-end"], help="cached: frozen backbone (default)")
    sp.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    sp.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (default: 0)")
    add_ray_address(sp)
    sp.add_argument("--storage", help="where checkpoints go: a path or URI (default: next to BUNDLE, in .runs)")
    sp.add_argument("--name", help="run name under --storage (default: the bundle's name; same name resumes)")
    sp.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT_DIR",
        help="continue the run of this --name / --out (same data and config; more epochs are fine); "
        "with a folder: start from that checkpoint",
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="start over: delete the run's checkpoints under --storage and replace --out",
    )
    add_quiet(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "tune",
        help="sweep hyper-parameters with Ray Tune; exports the best trial's bundle",
        description="Run a sweep from a tune_configs/*.yaml file: every trial trains like `crossrec "
        "train` (a TorchTrainer over the same train_func), ASHA stops the weak ones "
        "between epochs. Trials start from the file's `base` keys over TrainConfig's defaults "
        "(`basic`), not from `crossrec train`'s default `recommended`. Writes DIR/trials.csv, "
        "DIR/sweep.png and the best trial's bundle DIR/best; an interrupted sweep (Ctrl+C) "
        "continues with --resume.",
    )
    sp.add_argument(
        "sweep",
        metavar="SWEEP.yaml",
        help="sweep file (keys of crossrec.sweep.SweepConfig), e.g. tune_configs/cpu_cached.yaml",
    )
    add_data(sp)
    sp.add_argument(
        "--out", required=True, metavar="DIR", help="sweep folder (on a cluster: storage every node reaches)"
    )
    sp.add_argument(
        "--trials",
        type=int,
        help="trials drawn from the space (overrides `num_samples`; a grid runs every point this many times)",
    )
    sp.add_argument(
        "--users",
        type=int,
        metavar="N",
        help="sweep on every k-th of N users of --data (prepared once "
        "into DIR/data): a slice that finishes on a laptop",
    )
    add_ray_address(sp)
    sp.add_argument(
        "--resume", action="store_true", help="continue the interrupted sweep in DIR (same file, --trials and --data)"
    )
    sp.add_argument("--quiet", action="store_true", help="no per-epoch lines; the table at the end")
    sp.set_defaults(func=cmd_tune)
