"""bench/gpu_check.sh --dry-run: the GPU check's own code path on CPU (gloo, fp32, MiniLM, a 20-user real slice),
every configuration (LoRA and full fine-tuning under DDP, DeepSpeed ZeRO-2 and ZeRO-3) a real Ray Train fit in
its own process; the JSON must hold every row with positive throughput, memory and MFU. Run by
scripts/ci_deepspeed.sh (DeepSpeed installed: the ZeRO rows run), so the script that waits for a GPU cannot rot."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["lora-ddp", "lora-zero2", "lora-zero3", "full-ddp", "full-zero2", "full-zero3"]


def test_gpu_check_dry_run_writes_every_row_with_positive_numbers(tmp_path, vector_cache):
    import deepspeed  # noqa: F401  # the ZeRO rows need it: fail loudly where the extra is missing (no skip)

    out = tmp_path / "gpu_check"
    # A short folder of its own: Ray's socket paths under pytest's tmp_path pass the 107-byte AF_UNIX limit.
    ray_tmp = tempfile.mkdtemp(prefix="gc", dir="/tmp")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CROSSREC_GPU_CHECK_DRY": "1",  # the switch the script documents beside --dry-run
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)  # each configuration starts its own local Ray, as on the GPU machine
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "bench/gpu_check.sh"), "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=3000,  # six configurations, each bounded by the dry run's budget (420 s)
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    doc = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], doc)
    env_ = doc["environment"]
    assert env_["mode"] == "cpu-dry-run" and env_["device"] == "cpu" and env_["deepspeed"] == "installed"
    assert env_["peak_tflops"] > 0 and env_["matmul_tflops_measured"] > 0
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ROWS
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        for key in ("steps", "step_s", "tokens_per_s", "peak_rss_mb_rank0", "model_flops_per_token", "mfu"):
            assert r[key] > 0, (name, key, r[key])
        assert r["peak_gpu_mb_rank0"] == 0  # CPU: no CUDA memory
    # LoRA trains a sliver of the weights and costs 4N per token against full fine-tuning's 6N.
    n = rows["full-ddp"]["matmul_params"]
    assert rows["full-ddp"]["trainable_params"] > n > 10 * rows["lora-ddp"]["trainable_params"] > 0
    assert rows["full-ddp"]["model_flops_per_token"] == 6 * n
    assert 4 * n < rows["lora-ddp"]["model_flops_per_token"] < 4.1 * n
    assert "gpu_check:" in proc.stdout and "mfu" in proc.stdout  # the printed table
