"""`crossrec demo` end to end on a small sample: prepare, train (Ray Train), evaluate, recommend and one request
answered by the Ray Serve graph over HTTP on 127.0.0.1 (the README's first command runs it on 3,000 users)."""

import json
import re

import pytest

from crossrec_cli import main

# What Ray's processes print on their own: C++ log lines ("[2026-... E 123 456] core_worker.cc:..."), lines the
# raylet forwards, Serve's INFO lines, transformers' "Loading weights" bars, Python warnings.
RAY_NOISE = re.compile(
    r"^\S*\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]|\(raylet\)|^(INFO|DEBUG) \d{4}-|Loading weights|"
    r"core_worker\.cc|Warning:|^\s*warnings\.warn"
)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_sample_including_serve(ray_cluster, vector_cache, tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["demo", "--users", "150", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    captured = capfd.readouterr()  # file descriptors 1 and 2: Ray's C++ lines bypass sys.stdout/sys.stderr
    printed = captured.out
    noise = [ln for ln in (captured.out + captured.err).splitlines() if RAY_NOISE.search(ln)]
    assert not noise, "\n".join(noise)
    for step in ("== 1. prepare", "== 2. train", "== 3. evaluate", "== 4. recommend", "== 5. serve"):
        assert step in printed
    assert "POST http://127.0.0.1" in printed and "/v1/recommend -> model" in printed
    assert (out / "bundle" / "bundle.json").is_file() and (out / "bundle" / "curves.png").is_file()
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert {"crossrec", "popularity", "textknn"} <= set(metrics)
