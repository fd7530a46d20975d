"""DeepSpeed ZeRO-2 / ZeRO-3 inside a real 2-worker TorchTrainer on CPU (DS_ACCELERATOR=cpu, gloo): every rank
writes its shards into the reported Ray checkpoint; a run whose workers crash after epoch 1 is restarted by Ray
Train from that checkpoint and reaches exactly the loss of an uninterrupted run (model and optimizer state
restored); the ZeRO-3 end-to-end run, one LoRA adapter per domain, exports a bundle with a peft adapter per domain.

Slow (DeepSpeed start-up per fit, and its ops compile once per machine): run with scripts/ci_deepspeed.sh or
`.venv/bin/python -m pytest -q -m slow tests/test_deepspeed.py`."""

import json
import os

import pytest

from crossrec.config import RunSettings, load_config
from crossrec.dataset import Dataset
from crossrec.splits import Splits

pytestmark = pytest.mark.slow

# Data order, negatives and dropout are seeded per epoch and rank, so a resumed run reaches the loss of an
# uninterrupted one; fp32: bf16 on CPU is slow without AMX.
BASE = [
    "strategy=deepspeed",
    "deepspeed.bf16=false",
    "dim=32",
    "layers=1",
    "n_negatives=8",
    "batch_size=8",
    "valid_max_targets=0",
    "patience=0",
    "max_tokens=16",
    "lora.rank=4",
    "backbone_lr=1e-3",
    "epochs=2",
]


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_and_vector_cache(vector_cache):
    # Imported here, not at the top: the default run (slow deselected) still collects this file on machines
    # without the extra; a selected test fails loudly when it is missing (a skip would hide its absence).
    import deepspeed  # noqa: F401


def _state(result) -> dict:
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)


# ZeRO-3 runs end-to-end with one LoRA adapter per domain: each adapter is sharded, a batch may leave one idle.
@pytest.mark.parametrize("stage, mode, extra", [(2, "cached", []), (3, "end-to-end", ["lora.per_domain=true"])])
def test_zero_run_crashes_resumes_to_the_same_loss_and_exports(
    ray_cluster, micro_fk, tmp_path, monkeypatch, stage, mode, extra
):
    from crossrec.bundle import load_bundle
    from trainers.embed import embed_catalog
    from trainers.pipeline import Inputs, TrainedRun, finish_bundle
    from trainers.train import CRASH_ENV, fit

    data = Dataset.load(micro_fk)
    vec = embed_catalog(data, Splits(data), load_config(), progress=False)
    cfg = load_config(overrides=[*BASE, f"mode={mode}", f"deepspeed.zero_stage={stage}", *extra])

    def run(name: str, max_failures: int):
        settings = RunSettings(workers=2, name=name, storage_path=str(tmp_path / "runs"), max_failures=max_failures)
        return fit(micro_fk, cfg, settings, vec, progress=False)

    best, valid, result = run("straight", 0)
    straight = _state(result)["history"]
    assert straight[1]["train/loss"] < straight[0]["train/loss"]

    # Every worker raises after reporting epoch 1; Ray Train restarts the worker group from the epoch-1
    # checkpoint (a restart without it would crash again and exceed max_failures).
    monkeypatch.setenv(CRASH_ENV, "1")
    crashed = run("crashed", 1)[2]
    monkeypatch.delenv(CRASH_ENV)
    with crashed.checkpoint.as_directory() as folder:
        shards = sorted(os.listdir(os.path.join(folder, "deepspeed", "ds")))
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards), shards
    state = _state(crashed)
    assert state["resumed_after"] == [1]
    resumed = state["history"]
    assert [h["epoch"] for h in resumed] == [1, 2]
    for epoch in (0, 1):  # epoch 1 from the first attempt's checkpoint, epoch 2 from the restarted workers
        assert resumed[epoch]["train/loss"] == pytest.approx(straight[epoch]["train/loss"], rel=1e-5)
        assert resumed[epoch]["valid/ndcg@10"] == pytest.approx(straight[epoch]["valid/ndcg@10"], abs=1e-6)

    if mode == "end-to-end":  # ZeRO-3 gathers the sharded LoRA weights of every adapter for export
        out = tmp_path / "bundle"
        trained = TrainedRun(best, valid, straight)
        meta = finish_bundle(micro_fk, out, Inputs(str(vec), None, cfg), trained, RunSettings(), progress=False)
        for d in data.domains:
            assert (out / "adapter" / d / "adapter_model.safetensors").is_file()
        assert meta["config"]["strategy"] == "deepspeed" and 0 <= meta["metrics"]["test"]["all"]["ndcg@10"] <= 1
        assert load_bundle(out).meta["version"] == meta["version"]
