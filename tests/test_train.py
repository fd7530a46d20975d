"""Training with real Ray Train (2 workers, DDP over gloo), real MiniLM vectors, a tiny real slice."""

import json

import numpy as np
import pytest
import torch
from conftest import _subset

from crossrec.bundle import load_bundle
from crossrec.config import RunSettings, load_config
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import bundle_retriever
from crossrec.splits import Splits
from crossrec_cli import main

FAST = ["epochs=2", "dim=32", "layers=1", "n_negatives=32", "batch_size=32", "valid_max_targets=0", "patience=0"]


@pytest.fixture(scope="module")
def first_run(ray_cluster, vector_cache, tiny_fk, tmp_path_factory):
    from trainers.pipeline import train_bundle

    out = tmp_path_factory.mktemp("bundles") / "fk"
    meta = train_bundle(tiny_fk, out, load_config(overrides=FAST), RunSettings(workers=2, name="first"), progress=False)
    return out, meta


def test_two_worker_run_reports_validation_and_exports_a_bundle(first_run, tiny_fk):
    out, meta = first_run
    hist = meta["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["valid/ndcg@10"] <= 1 for h in hist)
    assert hist[1]["train/loss"] < hist[0]["train/loss"]
    assert meta["data_hash"] == Dataset.load(tiny_fk).content_hash
    assert (out / "model.safetensors").is_file() and (out / "items" / "food.parquet").is_file()
    assert meta["backbone"] == "minilm" and meta["domains"] == ["food", "kitchen"]


def test_bundle_round_trips_without_ray(first_run, tiny_fk):
    out, meta = first_run
    data = Dataset.load(tiny_fk)
    splits = Splits(data)
    res = evaluate(splits, bundle_retriever(load_bundle(out), data, splits))
    for d in ("food", "kitchen", "all"):
        assert res.metrics[d]["ndcg@10"] == pytest.approx(meta["metrics"]["test"][d]["ndcg@10"], abs=1e-6)


def test_resume_continues_from_the_last_checkpoint_and_reproduces(first_run, tiny_fk, tmp_path):
    from trainers.pipeline import train_bundle

    out, meta = first_run
    # Same storage and run name, one more epoch: Ray Train restores the run's latest checkpoint.
    more = load_config(overrides=[*FAST[1:], "epochs=3"])
    resumed = train_bundle(
        tiny_fk,
        tmp_path / "resumed",
        more,
        RunSettings(workers=2, name="first", storage_path=str(out.parent / ".runs")),
        progress=False,
    )
    hist = resumed["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[:2] == meta["metrics"]["history"]  # epochs 1-2 were not rerun
    # A fresh run with the same seed reproduces the metric.
    again = train_bundle(
        tiny_fk, tmp_path / "again", load_config(overrides=FAST), RunSettings(workers=2, name="again"), progress=False
    )
    assert again["metrics"]["history"][-1]["valid/ndcg@10"] == pytest.approx(hist[1]["valid/ndcg@10"])


def test_zero_shot_on_a_dataset_the_bundle_never_saw(first_run, tiny_ao, tmp_path, capsys):
    out, _ = first_run
    js = tmp_path / "zs.json"
    assert main(["evaluate", "--bundle", str(out), "--data", str(tiny_ao), "--json", str(js), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot: the bundle never trained on arts, office" in printed
    res = json.loads(js.read_text())
    # Calibrated (crossrec) and as trained, both reported.
    assert set(res["metrics"]) == {"crossrec", "crossrec-as-trained", "popularity", "textknn"}
    assert res["zero_shot_domains"] == ["arts", "office"]
    assert 0 <= res["metrics"]["crossrec"]["all"]["ndcg@10"] <= 1
    # The text prior's weights were chosen on this dataset's validation split, like textknn's, from one grid.
    prior = res["params"]["crossrec"]
    pop = {f"pop_{k}[{d}]" for k in ("weight", "window", "valid_ndcg10") for d in ("arts", "office")}
    assert set(prior) == {"text_prior_decay", "text_prior_cross", "learned_weight"} | pop
    assert all(
        prior[f"pop_weight[{d}]"] >= 0 and prior[f"pop_window[{d}]"] in ("all", "recent") for d in ("arts", "office")
    )
    assert "crossrec: text_prior_decay=" in printed and prior["learned_weight"] in (1.0, 0.5, 0.25, 0.0)
    assert (prior["text_prior_decay"], prior["text_prior_cross"]) in {
        (d, c) for d in (0.3, 0.6, 0.8) for c in (0.0, 0.1, 1.0)
    }
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(out),
                "--data",
                str(tiny_ao),
                "--json",
                str(js),
                "--quiet",
                "--as-trained",
                "--baselines",
                "popularity",
            ]
        )
        == 0
    )
    alone = json.loads(js.read_text())
    assert "crossrec" not in alone["params"]
    # Calibrating the copy left the as-trained model untouched.
    assert alone["metrics"]["crossrec"] == res["metrics"]["crossrec-as-trained"]


def test_recommend_prints_top_k_with_reasons(first_run, tiny_fk, capsys):
    out, _ = first_run
    data = Dataset.load(tiny_fk)
    food = data.interactions.filter(np.array(data.interactions.column("domain").to_pylist()) == "food")
    hist = food.column("item_id").to_pylist()[:3]
    assert (
        main(["recommend", "--bundle", str(out), "--domain", "kitchen", "--history", ",".join(hist), "--k", "3"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("because of [food]") >= 3 and "top 3 in kitchen" in printed
    assert main(["recommend", "--bundle", str(out), "--domain", "toys", "--history", hist[0]]) == 2
    assert "unknown domain 'toys' (known: food, kitchen)" in capsys.readouterr().err


def test_transfer_pretrain_then_finetune_adaptor(ray_cluster, vector_cache, tiny_fk, tmp_path, monkeypatch):
    from trainers.pipeline import train_bundle

    pre = train_bundle(
        tiny_fk,
        tmp_path / "pre",
        load_config(overrides=[*FAST, "train_domains=[food]"]),
        RunSettings(workers=1, name="pre"),
        progress=False,
    )
    assert pre["domains"] == ["food"]
    monkeypatch.chdir(tmp_path)  # a relative --init works although the workers run elsewhere
    ft = train_bundle(
        tiny_fk,
        tmp_path / "ft",
        load_config(overrides=[*FAST, "epochs=1", "train_domains=[kitchen]", "init_from=pre", "finetune=adaptor"]),
        RunSettings(workers=1, name="ft"),
        progress=False,
    )
    assert ft["domains"] == ["kitchen"] and ft["config"]["init_from"] == str(tmp_path / "pre")
    # The pre-training never saw a kitchen item: not in its catalog, not in its bundle.
    assert list(load_bundle(tmp_path / "pre").items) == ["food"]
    # Step 0 of the fine-tune is the pre-trained model (its kitchen domain id = pre's "unknown" row), and what
    # `finetune: adaptor` freezes is unchanged after training.
    from safetensors.torch import load_file

    from crossrec.config import config_from_dict
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.splits import splits_for
    from trainers.train import initial_model

    src = load_file(str(tmp_path / "pre" / "model.safetensors"))
    for key in ("tower.domain.weight", "tower.next_domain.weight"):
        src[key] = src[key][[1, 1]]  # kitchen and unknown both start from pre's unknown row
    cfg = config_from_dict(ft["config"])
    data = Dataset.load(tiny_fk)
    sp = splits_for(data, cfg, training=True)
    vecs = torch.from_numpy(backbone_vectors(data, sp, cfg.backbone, cfg.text_template, cfg.max_tokens))
    start = initial_model(cfg, data, sp, ["kitchen"], CrossRecModel(cfg, 1, in_dim=vecs.shape[1]), vecs)
    for k, v in start.state_dict().items():
        assert torch.equal(v, src[k]), k
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    frozen = [k for k in after if not k.startswith("adaptor.")]
    assert len(frozen) > 10
    for k in frozen:
        assert torch.equal(after[k], src[k]), k
    assert any(not torch.equal(after[k], src[k]) for k in after if k.startswith("adaptor."))  # it did train
    with pytest.raises(ValueError, match="`init_from`: .*nowhere is not a crossrec bundle"):
        train_bundle(
            tiny_fk,
            tmp_path / "bad",
            load_config(overrides=[*FAST, "init_from=nowhere"]),
            RunSettings(workers=1),
            progress=False,
        )


def test_warm_start_on_a_newer_snapshot_with_new_items_and_users(
    ray_cluster, vector_cache, tiny_fk, food_kitchen_csv, tmp_path, capsys
):
    """Retraining on new logs: a bundle of an older snapshot (tiny_fk) starts the training of a newer one that has
    users and items the bundle never saw, and lacks items it had; a model of another shape is refused in one line."""
    from safetensors.torch import load_file

    from crossrec.config import config_from_dict
    from crossrec.dataset import prepare
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.splits import splits_for
    from trainers.pipeline import train_bundle
    from trainers.train import initial_model

    old_run = load_config(overrides=[*FAST, "epochs=1", "item_ids=true"])  # ids: rows must follow their items
    train_bundle(tiny_fk, tmp_path / "old", old_run, RunSettings(workers=1, name="old"), progress=False)
    new = tmp_path / "new"
    prepare([_subset(food_kitchen_csv, tmp_path / "new-src", 150, extra_items=10)], new, progress=False)
    old_data, new_data = Dataset.load(tiny_fk), Dataset.load(new)

    old_items = set(old_data.items.column("item_id").to_pylist())
    new_items = set(new_data.items.column("item_id").to_pylist())
    new_users = set(new_data.interactions.column("user_id").to_pylist()) - set(
        old_data.interactions.column("user_id").to_pylist()
    )
    assert len(new_items - old_items) > 0 and len(old_items - new_items) > 0 and len(new_users) > 0

    cfg = load_config(overrides=[*FAST, "epochs=1", "item_ids=true", f"init_from={tmp_path / 'old'}"])
    warm = train_bundle(new, tmp_path / "warm", cfg, RunSettings(workers=1, name="warm"), progress=False)
    assert set(warm["metrics"]["test"]) >= {"food", "kitchen"}
    assert all(v["ndcg@10"] is not None for v in warm["metrics"]["test"].values())
    bundle = load_bundle(tmp_path / "warm")  # the new catalog whole, new items included
    assert {i for t in bundle.items.values() for i in t.column("item_id").to_pylist()} == new_items
    res = evaluate(Splits(new_data), bundle_retriever(bundle, new_data, Splits(new_data)), split="test")
    assert sum(res.n_targets.values()) > 0

    # Step 0 is the old model: every weight as trained, an item both snapshots have keeps its id row, an item
    # new to the catalog starts at zero like any item without an id row.
    src = load_file(str(tmp_path / "old" / "model.safetensors"))
    wcfg = config_from_dict(warm["config"])
    sp = splits_for(new_data, wcfg, training=True)
    vecs = torch.from_numpy(backbone_vectors(new_data, sp, wcfg.backbone, wcfg.text_template, wcfg.max_tokens))
    model = CrossRecModel(wcfg, 2, in_dim=vecs.shape[1], n_items=len(sp.item_ids))
    start = initial_model(wcfg, new_data, sp, ["food", "kitchen"], model, vecs).state_dict()
    for k, v in src.items():
        if k != "item_emb.weight":
            assert torch.equal(start[k], v), k
    old_sp = Splits(old_data)
    old_row = {iid: j for j, iid in enumerate(old_sp.item_ids.tolist())}
    for j, iid in enumerate(sp.item_ids.tolist()):
        want = src["item_emb.weight"][old_row[iid]] if iid in old_row else torch.zeros(wcfg.dim)
        assert torch.equal(start["item_emb.weight"][j], want), iid
    assert src["item_emb.weight"][:-1].abs().sum() > 0  # the old rows did train: the comparison means something

    # Another model shape: refused before any training, in one line naming the key and the value to set.
    argv = ["train", "--data", str(new), "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "old")]
    capsys.readouterr()
    assert main([*argv, "--config", "basic", "--set", "dim=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "crossrec train: error: `init_from`: the bundle has dim=32, this run 16; they must match "
        "(--set dim=32, or train without --init)"
    )
    assert not (tmp_path / "bad").exists()


def test_bad_config_and_arguments_fail_naming_the_field(tiny_fk, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"`lora.rank` must be > 0, got 0"):
        load_config(overrides=["lora.rank=0"])
    with pytest.raises(ValueError, match=r"unknown config key `epoch` \(accepted: adaptor, align_weight, backbone"):
        load_config(overrides=["epoch=3"])
    with pytest.raises(ValueError, match=r"`dim` \(30\) must be a multiple of `heads` \(4\)"):
        load_config(overrides=["dim=30", "heads=4"])
    (tmp_path / "c.yaml").write_text("lr: 0.01\nlora: {rank: 4, bogus: 1}\n")
    with pytest.raises(ValueError, match=r"unknown config key `lora.bogus`"):
        load_config(tmp_path / "c.yaml")
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "not a prepared crossrec dataset" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_fk), "--out", str(tmp_path / "b"), "--set", "mode=fast"]) == 2
    assert "`mode` must be one of cached, end-to-end, got 'fast'" in capsys.readouterr().err


def test_cold_user_bundle_is_evaluated_under_its_protocol_only(
    ray_cluster, vector_cache, cross_fk, tmp_path, capsys, first_run, tiny_fk
):
    from crossrec.baselines import Popularity
    from trainers.pipeline import train_bundle

    out = tmp_path / "cold"
    meta = train_bundle(
        cross_fk,
        out,
        load_config(overrides=[*FAST, "protocol=cold-user", "cold_fraction=0.5"]),
        RunSettings(workers=1, name="cold"),
        progress=False,
    )
    sp = Splits(Dataset.load(cross_fk), protocol="cold-user", cold_fraction=0.5)
    assert meta["metrics"]["n_targets"]["all"] == len(sp.targets("test")) > 0
    js = tmp_path / "cold.json"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(out),
                "--data",
                str(cross_fk),
                "--protocol",
                "cold-user",
                "--baselines",
                "popularity,textknn",
                "--json",
                str(js),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(js.read_text())
    assert res["protocol"]["protocol"] == "cold-user" and res["protocol"]["cold_fraction"] == 0.5
    assert res["n_targets"]["all"] == len(sp.targets("test"))
    assert res["metrics"]["popularity"] == evaluate(sp, Popularity(sp)).metrics
    assert set(res["metrics"]) == {"crossrec", "popularity", "textknn"}
    capsys.readouterr()
    for argv in (["--protocol", "leave-one-out"], ["--cold-fraction", "0.3"]):
        assert main(["evaluate", "--bundle", str(out), "--data", str(cross_fk), *argv, "--quiet"]) == 2
        assert "the bundle was trained under protocol=cold-user" in capsys.readouterr().err
    # And the other way round: a leave-one-out bundle has trained on every cold-user target.
    assert (
        main(["evaluate", "--bundle", str(first_run[0]), "--data", str(tiny_fk), "--protocol", "cold-user", "--quiet"])
        == 2
    )
    assert "the bundle was trained under protocol=leave-one-out, min_per_domain=3" in capsys.readouterr().err
