"""End-to-end LoRA / DeepSpeed measurements on a slice of a shared dataset; prints a table, writes JSON.

    .venv/bin/python bench/finetune.py --users 60 --parts quality,strategies,smollm2,overhead

quality:    cached vs end-to-end LoRA (minilm), one shared adapter and one adapter per domain: test NDCG@10 (all
            domains) and wall time of `train_bundle`
strategies: end-to-end LoRA (minilm) under ddp, deepspeed ZeRO-2, ZeRO-3 (2 workers): backbone tokens/s, step time,
            peak RSS of rank 0; with --per-domain each also with one adapter per domain
smollm2:    end-to-end LoRA on smollm2-135m (ddp, 2 workers): samples/s
overhead:   the same end-to-end step in a 1-worker TorchTrainer vs a plain in-process loop (ratio of step times)
With --gpus-per-worker 1 the same runs use GPUs (NCCL, bf16); --peak-tflops adds MFU (6 N tokens/s / peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's real-slice helper

SMALL = [
    "dim=32",
    "layers=1",
    "n_negatives=8",
    "batch_size=16",
    "max_tokens=32",
    "valid_max_targets=0",
    "patience=0",
    "lora.rank=8",
    "backbone_lr=1e-3",
]


def _slice(src: Path, users: int, work: Path) -> Path:
    from conftest import _subset

    from crossrec.dataset import prepare

    out = work / f"{src.name}-{users}cu"
    if not (out / "dataset.json").exists() and not out.exists():  # cross-domain users: every domain is trained
        prepare(
            [_subset(src, work / f"{src.name}-{users}cu-src", users, extra_items=0, cross_domain=True)],
            out,
            progress=False,
        )
    return out


def _run(data, cfg, settings, name):
    from trainers.train import fit

    t = time.time()
    _, _, result = fit(data, cfg, settings, _vectors(data, cfg.backbone), progress=False)
    with result.checkpoint.as_directory() as folder:
        hist = json.loads((Path(folder) / "state.json").read_text())["history"]
    return hist, time.time() - t


def _vectors(data, backbone: str = "minilm"):
    from crossrec.config import load_config
    from crossrec.dataset import Dataset
    from crossrec.splits import Splits
    from trainers.embed import embed_catalog

    ds = Dataset.load(data)
    return embed_catalog(ds, Splits(ds), load_config(overrides=[f"backbone={backbone}"]), progress=False)


def quality(data, args, out):
    from crossrec.config import RunSettings, load_config
    from trainers.pipeline import train_bundle

    rows = []
    for mode, per_domain in (("cached", False), ("end-to-end", False), ("end-to-end", True)):
        cfg = load_config(
            overrides=[*SMALL, f"mode={mode}", f"epochs={args.epochs}", f"lora.per_domain={str(per_domain).lower()}"]
        )
        t = time.time()
        name = f"q-{mode}{'-per-domain' if per_domain else ''}"
        meta = train_bundle(
            data,
            out / name,
            cfg,
            RunSettings(
                workers=args.workers, name=name, gpus_per_worker=args.gpus_per_worker, storage_path=str(out / "runs")
            ),
            progress=False,
        )
        rows.append(
            {
                "part": "quality",
                "mode": mode,
                "adapters": "per-domain" if per_domain else "shared",
                "test_ndcg@10": meta["metrics"]["test"]["all"]["ndcg@10"],
                "valid_ndcg@10": meta["metrics"]["history"][-1]["valid/ndcg@10"],
                "wall_s": time.time() - t,
                "fit_s": meta["metrics"]["time_s"]["fit"],
            }
        )
    return rows


def strategies(
    data, args, out, backbone="minilm", variants=(("ddp", 0), ("deepspeed", 2), ("deepspeed", 3)), adapters=("shared",)
):
    from crossrec.backbones import load_backbone
    from crossrec.config import RunSettings, load_config

    n_params = sum(p.numel() for p in load_backbone(backbone).parameters())
    rows = []
    for (strategy, stage), kind in [(v, k) for v in variants for k in adapters]:
        over = [
            *SMALL,
            "mode=end-to-end",
            f"backbone={backbone}",
            "epochs=1",
            f"max_steps={args.steps}",
            f"strategy={strategy}",
            "deepspeed.bf16=false",
            f"lora.per_domain={str(kind == 'per-domain').lower()}",
        ]
        if stage:
            over.append(f"deepspeed.zero_stage={stage}")
        name = f"s-{backbone}-{strategy}{stage or ''}-{kind}-{int(time.time())}"
        hist, wall = _run(
            data,
            load_config(overrides=over),
            RunSettings(
                workers=args.workers,
                name=name,
                gpus_per_worker=args.gpus_per_worker,
                storage_path=str(out / "runs"),
                max_failures=0,
            ),
            name,
        )
        h = hist[-1]
        row = {
            "part": "strategies",
            "backbone": backbone,
            "strategy": f"{strategy}{'-zero' + str(stage) if stage else ''}",
            "adapters": kind,
            "steps": h["step"],
            "step_s": h["train/step_s"],
            "tokens_per_s": h["train/tokens_per_s"],
            "samples_per_s": 16 / h["train/step_s"],
            "peak_rss_mb": h["worker/peak_rss_mb"],
            "peak_gpu_mb": h.get("worker/peak_gpu_mb", 0.0),
            "wall_s": wall,
        }
        if args.peak_tflops:  # forward 2N + backward 4N FLOPs per token (upper bound for LoRA: no weight grads)
            row["mfu"] = 6 * n_params * h["train/tokens_per_s"] / (args.peak_tflops * 1e12 * args.workers)
        rows.append(row)
    return rows


def overhead(data, args, out):
    """1 worker, 1 thread each side: the TorchTrainer's step time vs the same step in a plain loop."""
    from crossrec.config import RunSettings, load_config
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import build_end_to_end
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import SequenceData, loss_inputs, resolve_text_prior

    over = [*SMALL, "mode=end-to-end", "epochs=1", f"max_steps={args.steps}", "domain_dropout=0"]
    cfg = load_config(overrides=over)
    hist, _ = _run(
        data,
        cfg,
        RunSettings(workers=1, name=f"o-{int(time.time())}", storage_path=str(out / "runs"), max_failures=0),
        "overhead",
    )
    ray_step = hist[-1]["train/step_s"]

    torch.set_num_threads(1)  # as a 1-CPU Ray worker
    torch.manual_seed(cfg.seed)
    ds = Dataset.load(data)
    splits = Splits(ds)
    vecs = torch.from_numpy(np.load(_vectors(data)))
    cfg = resolve_text_prior(cfg, splits, vecs.numpy())  # as fit() does for the Ray run
    rec = CrossRecModel(cfg, len(splits.domains), in_dim=vecs.shape[1], n_items=len(splits.item_ids))
    rec.adaptor.init_from_vectors(vecs)
    texts = catalog_texts(ds.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
    model = build_end_to_end(cfg, rec, texts)
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]},
            {
                "params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")],
                "lr": cfg.backbone_lr,
            },
        ],
        lr=cfg.lr,
    )
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    seqs = SequenceData(splits, cfg.max_len)
    model.train()
    times = []
    batches = seqs.batches(cfg.batch_size, np.random.default_rng([cfg.seed, 0]))
    rng = np.random.default_rng([cfg.seed, 0, 0, 1])
    for _, batch in zip(range(args.steps), batches):
        t = time.time()
        inputs = loss_inputs(
            batch,
            lambda i: i,
            torch.from_numpy(splits.item_domain),
            domain_items,
            cfg.n_negatives,
            rng,
            len(splits.domains),
            0.0,
        )
        loss = model(**inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.time() - t)
    plain = float(np.mean(times))
    return [{"part": "overhead", "ray_step_s": ray_step, "plain_step_s": plain, "ratio": ray_step / plain}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="/work/shared/data/amazon-food-kitchen", help="a CSV dataset folder")
    ap.add_argument(
        "--users",
        type=int,
        default=60,
        help="first N users of --src with interactions in more than one domain (default 60)",
    )
    ap.add_argument("--parts", default="quality,strategies,smollm2,overhead")
    ap.add_argument("--epochs", type=int, default=2, help="quality runs")
    ap.add_argument("--steps", type=int, default=6, help="steps per throughput run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--peak-tflops", type=float, default=0, help="per device, for MFU (H100 bf16 dense: 989)")
    ap.add_argument("--per-domain", action="store_true", help="strategies: also one LoRA adapter per domain")
    ap.add_argument("--out", default="out/bench/finetune")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from trainers.runtime import init_ray

    init_ray()
    data = _slice(Path(args.src), args.users, out)
    rows = []
    for part in args.parts.split(","):
        t = time.time()
        if part == "quality":
            rows += quality(data, args, out)
        elif part == "strategies":
            variants = (("ddp", 0),) + ((("deepspeed", 2), ("deepspeed", 3)) if args.workers > 1 else ())
            rows += strategies(
                data,
                args,
                out,
                variants=variants,
                adapters=("shared", "per-domain") if args.per_domain else ("shared",),
            )
        elif part == "smollm2":
            rows += strategies(data, args, out, backbone="smollm2-135m", variants=(("ddp", 0),))
        elif part == "overhead":
            rows += overhead(data, args, out)
        else:
            raise SystemExit(f"unknown part {part!r} (quality, strategies, smollm2, overhead)")
        print(f"[{part}: {time.time() - t:.0f}s] {json.dumps(rows[-1])}", flush=True)
    meta = {"src": args.src, "users": args.users, "load_avg": os.getloadavg(), "args": vars(args), "rows": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"\nslice: first {args.users} cross-domain users of {args.src}; load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
