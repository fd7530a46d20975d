"""Two crossrec commands at once on one machine, each with its own local Ray: neither meets the other's instance
(Ray Train's placement-group cleaner used to fail with "Found multiple active Ray instances"). ID-based items, so
no backbone runs: the cost is two Ray start-ups and two short fits side by side."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAST = ["item_encoder=id", "epochs=2", "dim=32", "layers=1", "batch_size=32", "n_negatives=16", "valid_max_targets=50"]


@pytest.mark.slow
def test_two_trains_at_once_each_on_its_own_local_ray(tiny_fk, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path), CROSSREC_CACHE_DIR=str(tmp_path / "cache"))
    procs = []
    for name in ("a", "b"):
        cmd = [
            sys.executable,
            "-m",
            "crossrec_cli",
            "train",
            "--config",
            "basic",
            "--data",
            str(tiny_fk),
            "--out",
            str(tmp_path / name),
            "--workers",
            "1",
            "--quiet",
            *(x for kv in FAST for x in ("--set", kv)),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert "multiple active Ray instances" not in out, out[-4000:]
        assert "wrote bundle" in out
