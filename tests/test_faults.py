"""Real faults, not exceptions: a DDP worker process SIGKILLed mid-epoch (Ray Train restarts the worker group from
the last checkpoint and the run ends where an uninterrupted one ends), and a Tune trial whose process dies once
(Tune restarts it, `FailureConfig(max_failures=1)`, and the sweep's best is the one an undisturbed sweep finds)."""

import json
from pathlib import Path

import pytest
import yaml

from crossrec.config import RunSettings, load_config

FAST = ["epochs=3", "dim=32", "layers=1", "n_negatives=32", "batch_size=32", "valid_max_targets=0", "patience=0"]
# Data order, negatives and dropout are seeded per epoch and rank: a resumed run repeats the uninterrupted one's
# arithmetic, so its metrics agree to float rounding.
NDCG_TOL, LOSS_REL = 1e-6, 1e-5


def _latest_state(runs: Path, name: str) -> dict:
    states = [json.loads(p.read_text()) for p in (runs / name).glob("checkpoint_*/state.json")]
    return max(states, key=lambda s: s["epoch"])


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_the_checkpoint_to_the_uninterrupted_metric(
    ray_cluster, vector_cache, tiny_fk, tmp_path, monkeypatch
):
    from trainers.pipeline import train_bundle
    from trainers.train import KILL_ENV

    straight = train_bundle(
        tiny_fk,
        tmp_path / "straight",
        load_config(overrides=FAST),
        RunSettings(workers=2, name="straight"),
        progress=False,
    )
    pid_file = tmp_path / "killed.pid"
    monkeypatch.setenv(KILL_ENV, f"2:{pid_file}")
    killed = train_bundle(
        tiny_fk,
        tmp_path / "killed",
        load_config(overrides=FAST),
        RunSettings(workers=2, name="killed", max_failures=1),
        progress=False,
    )
    pid = int(pid_file.read_text())  # rank 1 wrote its pid, then SIGKILLed itself in epoch 2
    assert not Path(f"/proc/{pid}").exists()
    state = _latest_state(tmp_path / ".runs", "killed")
    assert state["resumed_after"] == [1]  # the restarted group went on from epoch 1's checkpoint
    a, b = straight["metrics"]["history"], killed["metrics"]["history"]
    assert [h["epoch"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["valid/ndcg@10"] == pytest.approx(x["valid/ndcg@10"], abs=NDCG_TOL)
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=LOSS_REL)
    assert killed["metrics"]["test"]["all"]["ndcg@10"] == pytest.approx(
        straight["metrics"]["test"]["all"]["ndcg@10"], abs=NDCG_TOL
    )


@pytest.mark.slow
def test_a_trial_that_dies_once_completes_and_the_best_is_unaffected(
    ray_cluster, vector_cache, tiny_fk, tmp_path, monkeypatch
):
    from crossrec.sweep import load_sweep
    from trainers.tune import KILL_TRIAL_ENV, run_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": {
                    "dim": 32,
                    "layers": 1,
                    "batch_size": 32,
                    "n_negatives": 32,
                    "valid_max_targets": 0,
                    "patience": 0,
                    "epochs": 2,
                },
                "space": {"lr": {"type": "grid", "values": [3.0e-3, 30.0]}},
                "scheduler": {"type": "fifo"},
                "max_concurrent_trials": 1,
                "workers_per_trial": 1,
            }
        )
    )
    calm = run_sweep(load_sweep(sweep), tiny_fk, tmp_path / "calm", progress=False)
    marker = tmp_path / "trial-killed"
    monkeypatch.setenv(KILL_TRIAL_ENV, f"1:{marker}")  # the first trial's process dies after its epoch 1
    hit = run_sweep(load_sweep(sweep), tiny_fk, tmp_path / "hit", progress=False)
    assert marker.is_file()  # a trial process really was killed
    assert [r.status for r in hit.records] == ["completed", "completed"]
    assert hit.best.params == calm.best.params
    assert hit.bundle["metrics"]["valid"]["valid/ndcg@10"] == pytest.approx(
        calm.bundle["metrics"]["valid"]["valid/ndcg@10"], abs=NDCG_TOL
    )
