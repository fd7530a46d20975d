#!/usr/bin/env bash
# One command for the tests (what .ci/run calls): install (or update) .venv, then the default test run (fast;
# `slow` and `gpu` tests are left out). Safe to run again. pytest options pass through:
# bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
