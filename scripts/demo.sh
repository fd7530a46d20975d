#!/usr/bin/env bash
# One command for a new user: install (or update) .venv, then run the demo end to end (prepare a sample of the
# vendored data, train with Ray Train, evaluate beside the baselines, recommend, answer one request from Ray
# Serve). Safe to run again: the install is idempotent and the demo rewrites its folder. Demo options pass
# through: bash scripts/demo.sh --users 1000 --epochs 2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/crossrec demo "$@"
