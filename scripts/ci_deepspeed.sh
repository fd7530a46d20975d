#!/usr/bin/env bash
# CI step for the slow fine-tuning tests (separate from the default test run, which never imports DeepSpeed):
# installs the optional DeepSpeed extra into .venv, builds the one CPU op the tests use (shm_comm) once in a
# single process, then runs DeepSpeed ZeRO-2/3 under a 2-worker TorchTrainer (crash, restart, same loss,
# export), the SmolLM2-135M LoRA steps, full fine-tuning with its export, and the GPU check's CPU dry run
# (bench/gpu_check.sh --dry-run: every configuration's row in its JSON). Run after scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
# Compiled ops go to this cache; Ray workers inherit it (and the driver passes it on, see trainers/strategies.py).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
# DS_BUILD_OPS=0: no op is compiled at install time (they are JIT-built on first use, below).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
start=$(date +%s)
# Every deepspeed.init_distributed builds shm_comm on CPU; build it here once instead of in two workers at once.
.venv/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
echo "shm_comm op ready in $(( $(date +%s) - start ))s"
.venv/bin/python -m pytest -q -m slow --durations=0 tests/test_deepspeed.py tests/test_finetune.py tests/test_gpu_check.py
