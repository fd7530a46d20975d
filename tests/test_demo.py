"""`crossrec demo` end to end on a small sample: prepare, train (Ray Train), evaluate, recommend and one request
answered by the Ray Serve graph over HTTP on 127.0.0.1 (the README's first command runs it on 3,000 users)."""

import json

import pytest

from crossrec_cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_sample_including_serve(ray_cluster, vector_cache, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--users", "150", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for step in ("== 1. prepare", "== 2. train", "== 3. evaluate", "== 4. recommend", "== 5. serve"):
        assert step in printed
    assert "POST http://127.0.0.1" in printed and "/v1/recommend -> model" in printed
    assert (out / "bundle" / "bundle.json").is_file() and (out / "bundle" / "curves.png").is_file()
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert {"crossrec", "popularity", "textknn"} <= set(metrics)
