#!/usr/bin/env bash
# GPU check of end-to-end LoRA (run on a machine with NVIDIA GPUs, after scripts/install.sh with a CUDA torch and
# `pip install --no-build-isolation deepspeed==0.19.8`): the same `crossrec train` as on CPU, with
# --gpus-per-worker 1 (Ray Train: NCCL process group, bf16 autocast), under DDP and DeepSpeed ZeRO-2/3, then the
# throughput bench with MFU. Usage: bash bench/gpu_check.sh [WORKERS] [BACKBONE]   (defaults: all GPUs, smollm2-135m)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${1:-$(nvidia-smi -L | wc -l)}
BACKBONE=${2:-smollm2-135m}
OUT=${OUT:-out/gpu_check}
SRC=${SRC:-/work/shared/data/amazon-food-kitchen}
PEAK=${PEAK_TFLOPS:-989}  # per GPU, bf16 dense (H100 SXM); set for other GPUs
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
.venv/bin/python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch (CPU build of torch?)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported(),
      "nccl", torch.distributed.is_nccl_available())
PY
[ -d "$OUT/data" ] || .venv/bin/crossrec prepare "$SRC" --out "$OUT/data"
for strategy in "ddp" "deepspeed --set deepspeed.zero_stage=2" "deepspeed --set deepspeed.zero_stage=3"; do
  name=$(echo "$strategy" | tr -cd 'a-z0-9')
  echo "== $BACKBONE end-to-end LoRA, $WORKERS GPU workers, strategy $strategy"
  # shellcheck disable=SC2086
  .venv/bin/crossrec train --data "$OUT/data" --out "$OUT/bundle-$name" --mode end-to-end --quiet \
      --workers "$WORKERS" --gpus-per-worker 1 --storage "$OUT/runs" --name "gpu-$name-$(date +%s)" \
      --set backbone="$BACKBONE" --set epochs=1 --set max_steps=50 --set batch_size=$((64 * WORKERS)) \
      --set strategy=$strategy
  test -f "$OUT/bundle-$name/adapter/adapter_model.safetensors"
done
# tokens/s, peak memory (rank 0 RSS; GPU memory: nvidia-smi during the run), MFU.
.venv/bin/python bench/finetune.py --src "$SRC" --users 2000 --parts strategies,smollm2 --steps 30 \
    --workers "$WORKERS" --gpus-per-worker 1 --peak-tflops "$PEAK" --out "$OUT/bench"
echo "gpu_check: OK"
