"""DeepSpeed ZeRO-2 / ZeRO-3 inside a real 2-worker TorchTrainer on CPU (DS_ACCELERATOR=cpu, gloo): every rank
writes its shards into the reported Ray checkpoint, a resumed run continues to exactly the loss of an uninterrupted
one (model and optimizer state restored), and a ZeRO-3 end-to-end LoRA run exports a peft adapter.

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
BASE = ["strategy=deepspeed", "deepspeed.bf16=false", "dim=32", "layers=1", "n_negatives=8", "batch_size=8",
        "valid_max_targets=0", "patience=0", "max_tokens=16", "lora.rank=4",
        "backbone_lr=1e-3"]


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_and_vector_cache(vector_cache):
    # Imported here, not at the top: the default run (slow deselected) still collects this file on machines
    # without the extra; a selected test fails loudly when it is missing (a skip would hide its absence).
    import deepspeed  # noqa: F401


def _history(result) -> list[dict]:
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)["history"]


@pytest.mark.parametrize("stage, mode", [(2, "cached"), (3, "end-to-end")])
def test_zero_checkpoint_resumes_to_the_same_loss(ray_cluster, micro_fk, tmp_path, stage, mode):
    from trainers.embed import embed_catalog
    from trainers.train import fit

    data = Dataset.load(micro_fk)
    vec = embed_catalog(data, Splits(data), load_config(), progress=False)

    def run(epochs: int, name: str):
        cfg = load_config(overrides=[*BASE, f"mode={mode}", f"deepspeed.zero_stage={stage}", f"epochs={epochs}"])
        settings = RunSettings(workers=2, name=name, storage_path=str(tmp_path / "runs"), max_failures=0)
        return fit(micro_fk, cfg, settings, vec, progress=False)[2]

    straight = _history(run(3, "straight"))
    cut = run(2, "cut")
    with cut.checkpoint.as_directory() as folder:
        shards = sorted(os.listdir(os.path.join(folder, "deepspeed", "ds")))
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards), shards
    first = _history(cut)
    resumed = _history(run(3, "cut"))  # same run name: Ray Train hands every rank the latest checkpoint
    assert resumed[:2] == first
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert resumed[2]["train/loss"] == pytest.approx(straight[2]["train/loss"], rel=1e-5)
    assert resumed[2]["valid/ndcg@10"] == pytest.approx(straight[2]["valid/ndcg@10"], abs=1e-6)
    assert straight[2]["train/loss"] < straight[0]["train/loss"]


def test_zero3_lora_run_exports_a_peft_adapter(ray_cluster, micro_fk, tmp_path):
    from trainers.train import train_bundle

    cfg = load_config(overrides=[*BASE, "mode=end-to-end", "deepspeed.zero_stage=3", "epochs=1"])
    meta = train_bundle(micro_fk, tmp_path / "b", cfg, RunSettings(workers=2, name="z3", max_failures=0),
                        progress=False)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()
    assert meta["config"]["strategy"] == "deepspeed" and 0 <= meta["metrics"]["test"]["all"]["ndcg@10"] <= 1
