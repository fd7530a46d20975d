"""Speed of one end-to-end training step on CPU against the machine's matmul limit; prints a table, writes JSON.

    PYTHONPATH=platform:. python bench/finetune_speed.py --threads 2 --steps 3 \
        --runs minilm:lora,minilm:full,smollm2-135m:lora,smollm2-135m:full [--set key=value ...]

matmul:  fp32 GEMM FLOP/s with --threads torch threads (the ceiling a step could reach), and per CPU second
         (a load-independent figure on a shared machine)
step:    the step `trainers.train.train_func` runs (same `initial_model`, `loss_inputs`, `make_strategy`), in this
         process on one rank, on a prepared slice (default: the tests' art-office mini slice, 2,900 items), at
         TrainConfig's defaults plus --set. Per step: wall time, backbone tokens (with / without gradients, real and
         padded), achieved FLOP/s (forward 2N per token; backward 2N more for LoRA, 4N for full fine-tuning; N the
         backbone's non-embedding weights), and the same for the epoch's validation (catalog re-embedding).
--profile writes a torch.profiler table of one step per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests" / "data" / "amazon-art-office-mini"


def matmul_flops(threads: int, n: int = 2048, reps: int = 10) -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second) of an n x n fp32 matmul, medians."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return 2 * n**3 / statistics.median(times), 2 * n**3 / statistics.median(cpus)


class TokenMeter:
    """Counts the backbone's tokens and time per forward, split by whether gradients are recorded."""

    def __init__(self, backbone: torch.nn.Module):
        self.reset()
        backbone.register_forward_pre_hook(self._pre)
        backbone.register_forward_hook(self._post)

    def reset(self) -> None:
        self.real = {True: 0, False: 0}
        self.padded = {True: 0, False: 0}
        self.forward_s = {True: 0.0, False: 0.0}
        self.calls = {True: 0, False: 0}

    def _pre(self, module, args):
        self._t = time.perf_counter()

    def _post(self, module, args, out):
        grad = torch.is_grad_enabled() and module.training
        mask = args[1]
        self.real[grad] += int(mask.sum())
        self.padded[grad] += mask.numel()
        self.forward_s[grad] += time.perf_counter() - self._t
        self.calls[grad] += 1


def non_embedding_params(model: torch.nn.Module) -> int:
    """Weights a token's matmuls touch: everything but the embedding tables (a lookup, not a matmul)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lora_" not in n)


def prepared(src: Path, out: Path) -> Path:
    from crossrec.dataset import prepare

    target = out / f"{src.name}-prepared"
    if not (target / "manifest.json").exists():
        prepare([src], target, progress=False, force=True)
    return target


def run_steps(
    data: Path,
    backbone: str,
    lora: bool,
    overrides: list[str],
    steps: int,
    warmup: int,
    profile: Path | None,
    with_valid: bool = True,
    fill_bank: bool = False,
) -> dict:
    from crossrec.config import load_config
    from crossrec.dataset import Dataset
    from crossrec.domains import domain_ids
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.splits import splits_for
    from crossrec.training import SequenceData, loss_inputs, resolve_text_prior
    from trainers.strategies import make_strategy
    from trainers.train import _eval_model, _param_groups, _validate, initial_model, make_item_input, model_domains

    cfg = load_config(
        overrides=["mode=end-to-end", f"backbone={backbone}", f"lora.enabled={str(lora).lower()}", *overrides]
    )
    torch.manual_seed(cfg.seed)
    ds = Dataset.load(data)
    splits = splits_for(ds, cfg, training=True)
    domains = model_domains(cfg, splits)
    vecs = torch.from_numpy(backbone_vectors(ds, splits, cfg.backbone, cfg.text_template, cfg.max_tokens))
    cfg = resolve_text_prior(cfg, splits, vecs.numpy())
    n_items = len(splits.item_ids)

    def new_recommender():
        return CrossRecModel(cfg, len(domains), in_dim=vecs.shape[1], n_items=n_items)

    t = time.perf_counter()
    model = initial_model(cfg, ds, splits, domains, new_recommender(), vecs)
    setup_s = time.perf_counter() - t
    strategy = make_strategy(cfg, 0, 1, torch.device("cpu"))
    strategy.prepare(model, _param_groups(model, cfg))
    meter = TokenMeter(model.encoder.backbone)
    n_params = non_embedding_params(model.encoder.backbone)
    seqs = SequenceData(splits, cfg.max_len, cfg.train_domains, domain_ids(domains, splits.domains))
    item_input = make_item_input(cfg, splits, None)
    item_domain = torch.from_numpy(splits.item_domain)
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    rng = np.random.default_rng(0)
    rows = []
    fill_s = 0.0
    if fill_bank:  # as after the first epoch's validation, which embeds the catalog and refills the bank
        t = time.perf_counter()
        model.refresh_bank(model.encoder.embed(torch.arange(n_items)))
        fill_s = time.perf_counter() - t
    strategy.train()
    epoch = 0
    while len(rows) < steps + warmup:  # warm-up steps (allocations, lazy inits) are not counted
        for batch in seqs.batches(max(1, cfg.batch_size), np.random.default_rng([cfg.seed, epoch])):
            meter.reset()
            t, cpu = time.perf_counter(), time.process_time()
            inputs = loss_inputs(
                batch, item_input, item_domain, domain_items, cfg.n_negatives, rng, len(domains), cfg.domain_dropout
            )
            t_in = time.perf_counter() - t
            if profile is not None and len(rows) == warmup:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    loss = strategy.step(strategy.to_device(inputs))
                profile.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            else:
                loss = strategy.step(strategy.to_device(inputs))
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            grad_tok, nograd_tok = meter.real[True], meter.real[False]
            mult = 4 if lora else 6  # LoRA: no weight gradients of the frozen base
            flops = 2 * n_params * nograd_tok + mult * n_params * grad_tok
            rows.append(
                {
                    "step_s": wall,
                    "cpu_s": cpu,
                    "inputs_s": t_in,
                    "fwd_grad_s": meter.forward_s[True],
                    "fwd_nograd_s": meter.forward_s[False],
                    "tokens": grad_tok + nograd_tok,
                    "tokens_grad": grad_tok,
                    "tokens_nograd": nograd_tok,
                    "padded_tokens": meter.padded[True] + meter.padded[False],
                    "items": int(len(inputs["item_x"])),
                    "flops": flops,
                    "loss": float(loss),
                }
            )
            print(
                f"  step {len(rows)}: {wall:.2f}s ({cpu:.1f} CPU s) loss {float(loss):.4f} tokens {grad_tok}+{nograd_tok}",
                flush=True,
            )
            if len(rows) >= steps + warmup:
                break
        epoch += 1
    timed = rows[warmup:]
    meter.reset()
    t = time.perf_counter()
    valid = {"valid/ndcg@10": float("nan")}
    if with_valid:
        rec, item_vecs = _eval_model(strategy, new_recommender, cfg, splits, item_input, n_items, 0, 1)
        valid = _validate(rec, item_vecs, splits, domains, cfg, 0, 1)
    valid_s = time.perf_counter() - t
    med = statistics.median(r["step_s"] for r in timed)
    tokens = statistics.median(r["tokens"] for r in timed)
    flops = statistics.median(r["flops"] for r in timed)
    return {
        "backbone": backbone,
        "tuning": "lora" if lora else "full",
        "overrides": overrides,
        "threads": torch.get_num_threads(),
        "non_embedding_params": n_params,
        "setup_s": setup_s,
        "fill_bank_s": fill_s,
        "steps": len(timed),
        "step_s": med,
        "step_s_all": [r["step_s"] for r in timed],
        "cpu_s": statistics.median(r["cpu_s"] for r in timed),
        "flop_per_cpu_s": flops / statistics.median(r["cpu_s"] for r in timed),
        "tokens_per_step": tokens,
        "tokens_grad": statistics.median(r["tokens_grad"] for r in timed),
        "padded_tokens": statistics.median(r["padded_tokens"] for r in timed),
        "items_per_step": statistics.median(r["items"] for r in timed),
        "fwd_grad_s": statistics.median(r["fwd_grad_s"] for r in timed),
        "fwd_nograd_s": statistics.median(r["fwd_nograd_s"] for r in timed),
        "inputs_s": statistics.median(r["inputs_s"] for r in timed),
        "tokens_per_s": tokens / med,
        "flops_per_s": flops / med,
        "valid_s": valid_s,
        "valid_tokens": meter.real[False],
        "valid_flops_per_s": 2 * n_params * meter.real[False] / max(meter.forward_s[False], 1e-9),
        "valid_ndcg@10": valid["valid/ndcg@10"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(MINI), help="a CSV dataset folder (default: the tests' art-office mini)")
    ap.add_argument("--runs", default="minilm:lora,minilm:full,smollm2-135m:lora,smollm2-135m:full")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps before the timed ones (not counted)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="TrainConfig override, repeatable")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step per run")
    ap.add_argument("--no-valid", action="store_true", help="skip the validation pass (catalog re-embedding)")
    ap.add_argument(
        "--fill-bank",
        action="store_true",
        help="time steps after a catalog embedding filled the bank (as validation does)",
    )
    ap.add_argument("--out", default="out/bench/finetune_speed")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    peak, peak_cpu = matmul_flops(args.threads)
    print(
        f"matmul fp32, {args.threads} threads: {peak / 1e9:.1f} GFLOP/s, {peak_cpu / 1e9:.1f} GFLOP/CPU-s", flush=True
    )
    data = prepared(Path(args.src), out)
    rows = []
    for run in args.runs.split(","):
        backbone, _, tuning = run.partition(":")
        print(f"{run}:", flush=True)
        prof = out / f"profile-{backbone}-{tuning}.txt" if args.profile else None
        row = run_steps(
            data, backbone, tuning != "full", args.set, args.steps, args.warmup, prof, not args.no_valid, args.fill_bank
        )
        row["peak_share"] = row["flops_per_s"] / peak
        row["peak_cpu_share"] = row["flop_per_cpu_s"] / peak_cpu
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "src": args.src,
        "matmul_flops": peak,
        "matmul_flop_per_cpu_s": peak_cpu,
        "load_avg": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(
        f"\nmatmul {peak / 1e9:.1f} GFLOP/s, {peak_cpu / 1e9:.1f} GFLOP/CPU-s ({args.threads} threads); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "backbone      tuning  s/step  CPU s/step  tokens/step (grad)  tokens/s  GFLOP/s  of peak  GFLOP/CPU-s  valid s"
    )
    for r in rows:
        print(
            f"{r['backbone']:<13} {r['tuning']:<6} {r['step_s']:7.2f}  {r['cpu_s']:9.1f}  {r['tokens_per_step']:8.0f} "
            f"({r['tokens_grad']:5.0f})  {r['tokens_per_s']:8.0f}  {r['flops_per_s'] / 1e9:7.1f}  "
            f"{r['peak_share']:6.1%}  {r['flop_per_cpu_s'] / 1e9:10.1f}  {r['valid_s']:7.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
