"""`crossrec inspect BUNDLE`: what a bundle holds, read from its files without loading the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crossrec_cli.options import UsageError

__all__ = ["register"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _changed(cfg: dict) -> dict:
    """The bundle's config keys that differ from TrainConfig's defaults (dotted), in field order."""
    from crossrec.config import config_help

    defaults = {key: default for key, default, _ in config_help()}
    flat = {}
    for k, v in cfg.items():
        for kk, vv in v.items() if isinstance(v, dict) else [(None, v)]:
            flat[f"{k}.{kk}" if kk else k] = vv
    out = {}
    for key, value in flat.items():
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if key in defaults and shown != defaults[key]:
            out[key] = value
    return out


def bundle_summary(path: Path) -> dict:
    """Everything `crossrec inspect` prints, as data (its --json)."""
    from crossrec.bundle import bundle_meta, served_domains

    meta = bundle_meta(path, "BUNDLE")
    cfg, metrics = meta["config"], meta.get("metrics") or {}
    items = {}
    for d in served_domains(meta):
        f = path / "items" / f"{d}.parquet"
        if f.is_file():
            import pyarrow.parquet as pq

            items[d] = pq.ParquetFile(f).metadata.num_rows
    adapter = None
    if (path / "adapter").is_dir():
        from crossrec.finetune import domain_adapters, is_adapter_dir

        folders = (
            [path / "adapter"]
            if is_adapter_dir(path / "adapter")
            else [path / "adapter" / d for d in domain_adapters(path / "adapter")]
        )
        adapter = {
            "kind": "peft LoRA" if folders else "full fine-tune (Hugging Face model)",
            "adapters": {
                f.name: {
                    k: v
                    for k, v in json.loads((f / "adapter_config.json").read_text()).items()
                    if k in ("r", "lora_alpha", "lora_dropout", "target_modules")
                }
                for f in folders
            },
        }
    parts = {p.name: _size(p) for p in sorted(path.iterdir())}
    return {
        "path": str(path),
        "version": meta["version"],
        "created_by": meta.get("created_by"),
        "created_at": meta.get("created_at"),
        "backbone": meta.get("backbone") or cfg.get("backbone"),
        "mode": cfg.get("mode"),
        "item_encoder": cfg.get("item_encoder"),
        "adapter": adapter,
        "ranker": (path / "ranker").is_dir(),
        "domains": items,
        "adapted": {
            d: {k: a.get(k) for k in ("calibration", "uses", "dataset", "n_train_interactions", "adapted_at")}
            for d, a in (meta.get("adapted") or {}).items()
        },
        "data_hash": meta.get("data_hash"),
        "dataset": meta.get("dataset"),
        "config_changed": _changed(cfg),
        "priors": _priors(meta),
        "run": meta.get("run"),
        "valid": metrics.get("valid"),
        "test": metrics.get("test"),
        "n_targets": metrics.get("n_targets"),
        "epochs": len(metrics.get("history") or []),
        "time_s": metrics.get("time_s"),
        "libraries": meta.get("libraries"),
        "size": parts,
        "total_size": sum(parts.values()),
    }


def _priors(meta: dict) -> dict:
    """Each prior of the bundle, in order: its weights per domain and the option chosen with them."""
    from crossrec.priors import bundle_prior_names, prior_class

    out = {}
    for name in bundle_prior_names(meta):
        try:
            cls = prior_class(name)
        except ValueError:  # a plugin this environment cannot import: its entry is unknown here
            out[name] = {"weights": {}, "option": {}, "option_name": "option"}
            continue
        entry = meta.get(cls.meta_key) or {}
        option = entry.get(cls.option_name, {})
        out[name] = {
            "weights": entry.get("weights", {}),
            "option": option if isinstance(option, dict) else {},
            "option_name": cls.option_name,
        }
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.bundle)
    if not path.is_dir():
        raise UsageError(f"{path}: no such bundle folder")
    s = bundle_summary(path)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"bundle   {s['path']}  (version {s['version']}; {s['created_by']}, {s['created_at']})")
    print(
        f"model    {s['mode']} {s['item_encoder']} encoder over backbone {s['backbone']}"
        f"{'; + ranker' if s['ranker'] else ''}"
    )
    if s["adapter"]:
        for name, a in s["adapter"]["adapters"].items():
            print(
                f"adapter  {s['adapter']['kind']} {name}: r={a.get('r')} alpha={a.get('lora_alpha')} "
                f"dropout={a.get('lora_dropout')} on {', '.join(sorted(a.get('target_modules') or []))}"
            )
    print(f"domains  {', '.join(f'{d} ({n:,} items)' for d, n in s['domains'].items())}")
    for d, a in s["adapted"].items():
        c = a["calibration"]
        print(
            f"adapted  {d} (crossrec adapt on {a['dataset']}, {a['n_train_interactions']:,} training interactions): "
            f"scores with {' + '.join(a['uses'])}; learned weight {c['learned_weight']}, text prior decay "
            f"{c['text_prior_decay']}, cross {c['text_prior_cross']}"
        )
    print(f"data     {s['dataset']}  (hash {s['data_hash']})")
    changed = ", ".join(f"{k}={v}" for k, v in s["config_changed"].items()) or "all TrainConfig defaults"
    print(f"config   {changed}  (changed from TrainConfig's defaults, `basic`: crossrec train --help-config)")
    for name, p in s["priors"].items():
        print(
            f"prior    {name}, weight per domain (chosen on validation): "
            + ", ".join(
                f"{d} {w:.4g}" + (f" ({p['option_name']} {p['option'][d]})" if d in p["option"] else "")
                for d, w in p["weights"].items()
            )
        )
    if s["test"]:
        print(
            f"metrics  {s['epochs']} epochs; valid ndcg@10 {s['valid'].get('valid/ndcg@10', float('nan')):.4f}; "
            f"test (full ranking):"
        )
        for d, m in s["test"].items():

            def show(key: str) -> str:  # None: no targets in that domain (cold-user: a first-interaction domain)
                return "-" if m[key] is None else f"{m[key]:.4f}"

            print(
                f"           {d:<10} targets {s['n_targets'].get(d, 0):>7,}  recall@10 {show('recall@10')}  "
                f"ndcg@10 {show('ndcg@10')}  mrr@10 {show('mrr@10')}"
            )
    libs = s["libraries"]
    print(
        "library  "
        + (
            ", ".join(f"{k} {v}" for k, v in libs.items())
            if libs
            else "versions not recorded (bundle written before crossrec recorded them)"
        )
    )
    print(f"size     {_mb(s['total_size'])}: " + ", ".join(f"{k} {_mb(v)}" for k, v in s["size"].items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "inspect",
        help="show what a bundle holds: backbone, domains, config, metrics, size",
        description="Print a bundle's backbone and adapter, domains and catalog sizes, the config "
        "keys that differ from TrainConfig's defaults (`basic`), the data hash, validation and test "
        "metrics, the library versions it was trained with, and its size on disk.",
    )
    sp.add_argument(
        "bundle", metavar="BUNDLE", help="a bundle folder (`crossrec train --out`, `crossrec tune`: DIR/best)"
    )
    sp.add_argument("--json", action="store_true", help="print it as JSON")
    sp.set_defaults(func=cmd_inspect)
