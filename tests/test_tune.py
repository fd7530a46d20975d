"""Sweeps with real Ray Tune over the real train_func (TorchTrainer per trial), MiniLM vectors, a tiny real slice."""

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from crossrec.baselines.textknn import CROSS_WEIGHTS, DECAYS
from crossrec.sweep import load_sweep, sweep_from_dict
from crossrec_cli import main

REPO = Path(__file__).parents[1]
TINY = {"dim": 32, "layers": 1, "batch_size": 32, "n_negatives": 32, "valid_max_targets": 0, "patience": 0}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _all_cpus_free(ray, n: int = 2, wait_s: float = 10) -> bool:
    """The cluster's resource view trails a removed placement group by a moment."""
    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU") != n and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU") == n


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_three_trial_sweep_stops_trials_early_and_exports_the_best(
    ray_cluster, vector_cache, tiny_fk, tmp_path, capsys
):
    # One sensible learning rate first, then two that wreck the model: ASHA (grace 1, factor 2) must stop
    # the later trials at their first rung, below the first trial's epoch-1 score. The graph's vectors are
    # built once for all trials, as `crossrec train` builds them.
    sweep = _write(
        tmp_path / "sweep.yaml",
        {
            "base": {**TINY, "epochs": 4, "graph": {"enabled": True}, "fusion": "attention"},
            "space": {"lr": {"type": "grid", "values": [3.0e-3, 10.0, 30.0]}},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            "workers_per_trial": 1,
        },
    )
    out = tmp_path / "sweep"
    assert main(["tune", str(sweep), "--data", str(tiny_fk), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = _csv(out / "trials.csv")
    assert len(rows) == 3 and {r["lr"] for r in rows} == {"0.003", "10.0", "30.0"}
    assert rows[0]["lr"] == "0.003" and rows[0]["status"] == "completed" and rows[0]["epochs"] == "4"
    early = [r for r in rows if r["status"] == "stopped early"]
    assert early and all(int(r["epochs"]) < 4 for r in early)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "best valid/ndcg@10" in printed and "stopped early" in printed
    # Stopped trials gave their CPUs back.
    assert _all_cpus_free(ray_cluster)
    meta = json.loads((out / "best" / "bundle.json").read_text())
    assert meta["run"]["params"] == {"lr": 0.003} and meta["config"]["lr"] == 0.003
    assert meta["config"]["graph"]["enabled"] and meta["config"]["side_dims"] == [meta["in_dim"] - 384]
    # The text prior's weights were chosen once for the sweep (textknn's grid on validation) and exported.
    assert meta["config"]["text_prior_decay"] in DECAYS and meta["config"]["text_prior_cross"] in CROSS_WEIGHTS
    assert meta["metrics"]["valid"]["valid/ndcg@10"] == pytest.approx(float(rows[0]["best valid/ndcg@10"]))
    assert (
        main(
            ["evaluate", "--bundle", str(out / "best"), "--data", str(tiny_fk), "--baselines", "popularity", "--quiet"]
        )
        == 0
    )
    assert "crossrec" in capsys.readouterr().out
    # The folder is taken: a second run must say how to continue instead of mixing two sweeps.
    assert main(["tune", str(sweep), "--data", str(tiny_fk), "--out", str(out)]) == 2
    assert "already holds a sweep: pass --resume" in capsys.readouterr().err


class _InterruptAtFirstResult:
    """Sends this process SIGINT, as Ctrl+C would, when the first epoch of the sweep is reported."""

    def __new__(cls):
        from ray import tune

        class Interrupt(tune.Callback):
            sent = False

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if not self.sent:
                    self.sent = True
                    os.kill(os.getpid(), signal.SIGINT)

        return Interrupt()


def test_a_sweep_whose_base_enables_the_ranker_exports_the_best_bundle_with_its_ranker(
    ray_cluster, vector_cache, tiny_fk, tmp_path
):
    """The best trial is finished by the same function as `crossrec train` (trainers.pipeline.finish_bundle): the
    ranker the base config enables is trained on it, as `crossrec train` would."""
    from crossrec.bundle import load_bundle
    from crossrec.recommender import HistoryItem, Recommender

    sweep = _write(
        tmp_path / "sweep.yaml",
        {
            "base": {**TINY, "epochs": 1, "ranker": {"enabled": True, "top_n": 20, "epochs": 2, "patience": 0}},
            "space": {"lr": {"type": "grid", "values": [1.0e-3, 3.0e-3]}},
            "max_concurrent_trials": 1,
            "workers_per_trial": 1,
        },
    )
    out = tmp_path / "sweep"
    assert main(["tune", str(sweep), "--data", str(tiny_fk), "--out", str(out), "--quiet"]) == 0
    bundle = load_bundle(out / "best")
    assert len(_csv(out / "trials.csv")) == 2 and bundle.has_ranker
    assert json.loads((out / "best" / "ranker" / "ranker.json").read_text())["config"]["top_n"] == 20
    rec = Recommender.load(bundle)
    assert rec.ranker is not None and rec.n_candidates == 20
    item = rec.ids["food"][0]
    assert len(rec.recommend([HistoryItem("food", item)], "kitchen", k=5)) == 5


def test_an_interrupted_sweep_resumes_where_it_stopped(ray_cluster, vector_cache, tiny_fk, tmp_path, capsys):
    from trainers.tune import run_sweep

    # A good learning rate, then one that wrecks the model; Ctrl+C during the first trial's first epochs.
    path = _write(
        tmp_path / "sweep.yaml",
        {
            "base": {**TINY, "epochs": 4},
            "space": {"lr": {"type": "grid", "values": [3.0e-3, 30.0]}},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            "workers_per_trial": 1,
        },
    )
    out = tmp_path / "sweep"
    first = run_sweep(load_sweep(path), tiny_fk, out, progress=False, callbacks=[_InterruptAtFirstResult()])
    assert first.interrupted and first.bundle is None and not (out / "best").exists()
    # Trials are drawn one at a time (max_concurrent_trials 1): only the first exists yet, cut off mid-run.
    assert [r.status for r in first.records] == ["unfinished"] and (out / "trials.csv").is_file()
    assert _all_cpus_free(ray_cluster)  # the interrupted trial's workers are gone
    capsys.readouterr()

    assert main(["tune", str(path), "--data", str(tiny_fk), "--out", str(out), "--resume", "--quiet"]) == 0
    rows = {r["lr"]: r for r in _csv(out / "trials.csv")}
    cut = first.records[0].trial_id
    assert rows["0.003"]["trial"] == cut and rows["0.003"]["status"] == "completed" and rows["0.003"]["epochs"] == "4"
    # The cut-off trial went on from its Train checkpoint instead of starting over: no epoch reported twice.
    reported = [json.loads(line)["epoch"] for line in open(out / "experiment" / cut / "result.json")]
    assert reported == sorted(set(reported)) and reported[0] == 1
    # ASHA kept its rungs across the restore: the second trial was judged against the first one's epoch 1.
    assert rows["30.0"]["status"] == "stopped early"
    assert json.loads((out / "best" / "bundle.json").read_text())["run"]["trial"] == cut
    # Resuming with another space is refused.
    other = _write(tmp_path / "other.yaml", {**yaml.safe_load(path.read_text()), "num_samples": 2})
    assert main(["tune", str(other), "--data", str(tiny_fk), "--out", str(out), "--resume"]) == 2
    assert "was started with a different sweep config" in capsys.readouterr().err


def test_shipped_sweeps_validate(tiny_fk, tmp_path, capsys):
    cpu = load_sweep(REPO / "tune_configs" / "cpu_cached.yaml")
    assert cpu.base_config().mode == "cached" and cpu.scheduler.type == "asha"
    assert cpu.base_params() == {"lr": 1e-3, "temperature": 0.2, "layers": 2, "batch_size": 256, "dim": 64}
    lora = load_sweep(REPO / "tune_configs" / "lora_lr_rank.yaml")
    assert lora.base_config().mode == "end-to-end" and lora.base_config().backbone == "minilm"
    assert set(lora.space) == {"backbone_lr", "lr", "lora.rank"}
    assert lora.trial_config({"lora.rank": 4, "lr": 1e-4, "backbone_lr": 1e-4}).lora.rank == 4
    # On 2 cores: one worker with both cores per trial, trials in turn.
    assert (lora.max_concurrent_trials, lora.workers_per_trial, lora.cpus_per_worker) == (1, 1, 2)


@pytest.mark.slow
def test_lora_sweep_exports_the_best_trials_adapter_loadable_with_plain_peft(
    ray_cluster, vector_cache, micro_fk, tmp_path, capsys
):
    """End-to-end trials (LoRA rank x learning rate) through the same train_func; the best bundle's adapter/ is
    peft's own format. MiniLM with 16-token texts keeps it small; the shipped file runs SmolLM2."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from crossrec.backbones import resolve_backbone

    shipped = yaml.safe_load((REPO / "tune_configs" / "lora_lr_rank.yaml").read_text())
    sweep = _write(
        tmp_path / "lora.yaml",
        {
            **shipped,
            "base": {
                **shipped["base"],
                "backbone": "minilm",
                "epochs": 1,
                "dim": 32,
                "layers": 1,
                "batch_size": 8,
                "n_negatives": 4,
                "max_tokens": 16,
                "valid_max_targets": 0,
                "patience": 0,
            },
            "space": {"lr": {"type": "grid", "values": [1.0e-3]}, "lora.rank": {"type": "grid", "values": [2, 4]}},
            "num_samples": 1,
            "cpus_per_worker": 1,
        },
    )
    out = tmp_path / "lora"
    assert main(["tune", str(sweep), "--data", str(micro_fk), "--out", str(out), "--users", "20", "--quiet"]) == 0
    rows = _csv(out / "trials.csv")
    assert sorted(r["lora.rank"] for r in rows) == ["2", "4"] and all(r["status"] == "completed" for r in rows)
    best = max(rows, key=lambda r: float(r["best valid/ndcg@10"]))
    meta = json.loads((out / "best" / "bundle.json").read_text())
    assert meta["config"]["mode"] == "end-to-end" and meta["config"]["lora"]["rank"] == int(best["lora.rank"])
    assert json.loads((out / "data" / "manifest.json").read_text())["counts"]  # the --users slice
    # Outside crossrec: plain transformers + peft load the adapter, with the best trial's rank.
    cfg = json.loads((out / "best" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == int(best["lora.rank"])
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(resolve_backbone("minilm").path, local_files_only=True), str(out / "best" / "adapter")
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(torch.abs(p).max()) > 0 for p in lora_b)  # trained: B starts at zero


def test_a_lora_trial_changes_its_adapter_and_its_validation_differs_from_the_frozen_backbone(
    ray_cluster, vector_cache, micro_fk, tmp_path
):
    """The shipped LoRA sweep's trial (shrunk: MiniLM, 16-token texts, one trial of 2 epochs) trains its adapter,
    and that is what its validation measures: the trial's reported NDCG@10 is the one its recommender gets with
    the adapted backbone's vectors, not the one it gets with the frozen backbone's."""
    from safetensors.torch import load_file

    from crossrec.backbones import load_backbone
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.early_stopping import VALID_METRIC
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.inference import bundle_backbone
    from crossrec.splits import splits_for
    from trainers.train import _validate, model_domains
    from trainers.tune import run_sweep

    shipped = yaml.safe_load((REPO / "tune_configs" / "lora_lr_rank.yaml").read_text())
    small = {"dim": 32, "layers": 1, "batch_size": 8, "n_negatives": 4, "max_tokens": 16, "valid_max_targets": 0}
    sweep = sweep_from_dict(
        {
            **shipped,
            "base": {**shipped["base"], **small, "backbone": "minilm", "epochs": 2, "patience": 0},
            "space": {"backbone_lr": {"type": "grid", "values": [1.0e-3]}},
            "scheduler": {"type": "fifo"},
            "num_samples": 1,
            "cpus_per_worker": 1,
        }
    )
    result = run_sweep(sweep, micro_fk, tmp_path / "lora", progress=False)
    (trial,) = result.records
    assert trial.status == "completed" and [h["step"] for h in trial.history][-1] >= 4
    # LoRA's B matrices start at zero: every one of them moved.
    last = load_file(str(Path(trial.history[-1]["checkpoint_path"]) / "backbone.safetensors"))
    lora_b = [v for k, v in last.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)

    bundle = load_bundle(tmp_path / "lora" / "best")
    cfg = bundle.config
    data = Dataset.load(micro_fk)
    splits = splits_for(data, cfg, training=True)
    texts = catalog_texts(data.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))

    def valid_ndcg(backbone) -> float:
        vecs = torch.from_numpy(backbone.encode(texts, max_length=cfg.max_tokens))
        with torch.inference_mode():
            items = bundle.model.item_vectors(vecs)
        return _validate(bundle.model, items, splits, model_domains(cfg, splits), cfg, 0, 1)[VALID_METRIC]

    reported = trial.best(VALID_METRIC, "max")[VALID_METRIC]
    adapted, frozen = valid_ndcg(bundle_backbone(bundle)), valid_ndcg(load_backbone(cfg.backbone))
    assert adapted == pytest.approx(reported, abs=1e-6)
    assert abs(adapted - frozen) > 1e-4


BASE_SWEEP = {"space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"space": {"lora.rnak": {"type": "grid", "values": [4, 8]}}},
            r"`space.lora.rnak`: unknown config key `lora.rnak` \(accepted: lora.alpha, lora.dropout, lora.enabled, "
            r"lora.per_domain, lora.rank, lora.target_modules\)",
        ),
        (
            {"schedular": {"type": "asha"}},
            r"unknown sweep key `schedular` \(accepted: base, cpus_per_worker, "
            r"gpus_per_worker, include_base, max_concurrent_trials, metric, mode, "
            r"num_samples, scheduler, search, space, workers_per_trial\)",
        ),
        (
            {"scheduler": {"type": "asha", "grace": 1}},
            r"unknown sweep key `scheduler.grace` \(accepted: "
            r"scheduler.grace_period, scheduler.max_t",
        ),
        ({"space": {"lr": {"type": "loguniform", "low": 0, "high": 1}}}, r"`space.lr.low` must be > 0 for loguniform"),
        (
            {"space": {"lr": {"type": "normal", "low": 0, "high": 1}}},
            r"`space.lr.type` must be one of loguniform, uniform, randint, choice, grid, got 'normal'",
        ),
        (
            {"space": {"layers": {"type": "uniform", "low": 1, "high": 3}}},
            r"`space.layers`: `layers` is an integer; uniform \[1, 3\] does not give one \(use randint, choice or grid\)",
        ),
        ({"space": {"lora.rank": {"type": "choice", "values": [8, 0]}}}, r"`space.lora.rank`: `lora.rank` must be > 0"),
        (
            {"space": {"dim": {"type": "choice", "values": [32, 30]}, "heads": {"type": "grid", "values": [2, 4]}}},
            r"`space`: the combination dim=30, heads=4 is not a valid config: `dim` \(30\) must be a multiple of "
            r"`heads` \(4\)",
        ),
        (
            {"space": {"backbone": {"type": "choice", "values": ["minilm", "smollm2-135m"]}}},
            r"`space.backbone`: `backbone` cannot be searched: the catalog vectors are computed once per sweep",
        ),
        (
            {"space": {"graph.layers": {"type": "grid", "values": [1, 2]}}},
            r"`space.graph.layers`: `graph.layers` cannot be searched: the catalog vectors are computed once",
        ),
        ({"base": {"epoch": 3}}, r"`base`: unknown config key `epoch`"),
        ({"mode": "maximize"}, r"`mode` must be max or min, got 'maximize'"),
        ({"metric": "ndcg"}, r"`metric` must be a reported metric"),
        (
            {"search": {"type": "optuna"}, "space": {"lr": {"type": "grid", "values": [1e-3]}}},
            r"optuna samples; it cannot run `grid` keys",
        ),
    ],
)
def test_bad_sweep_files_fail_naming_the_key(tmp_path, change, message):
    path = _write(tmp_path / "bad.yaml", {**BASE_SWEEP, **change})
    with pytest.raises(ValueError, match=message):
        load_sweep(path)


def test_bad_sweep_reaches_the_cli_as_one_line(tiny_fk, tmp_path, capsys):
    path = _write(tmp_path / "bad.yaml", {"space": {"lora.rnak": {"type": "grid", "values": [4, 8]}}})
    assert main(["tune", str(path), "--data", str(tiny_fk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "`space.lora.rnak`: unknown config key `lora.rnak`" in err
    assert main(["tune", str(tmp_path / "none.yaml"), "--data", str(tiny_fk), "--out", str(tmp_path / "o")]) == 2
    assert "no such sweep file" in capsys.readouterr().err


def test_yaml_numbers_and_randint_bounds():
    s = sweep_from_dict(
        {
            "space": {
                "lr": {"type": "loguniform", "low": "3e-4", "high": "1e-2"},
                "layers": {"type": "randint", "low": 1, "high": 3},
            }
        }
    )
    assert s.space["lr"].low == 3e-4 and s.space["layers"].high == 3
    assert s.trial_config({"lr": 5e-4, "layers": 3}).layers == 3
