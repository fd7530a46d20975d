"""`crossrec adapt`: a bundle whose model knows food only is adapted to kitchen on the real food-kitchen slice.
The adapted bundle's stored calibration and priors give, through `crossrec evaluate` and the Recommender (what
Serve runs), exactly what adapt computed in memory; food answers as before; a kitchen without logs gets text only.
Real MiniLM vectors, an untrained (textknn-initialised) model, no Ray."""

from __future__ import annotations

import csv
import json

import pytest


@pytest.fixture(scope="module")
def food_bundle(tmp_path_factory, cross_fk, vector_cache):
    """A bundle over food alone (model, items, both priors chosen on food's validation targets)."""
    import torch
    from conftest import bundle_items, fit_priors

    from crossrec.bundle import BundleContents, load_bundle, save_bundle
    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.retrieval import Retriever
    from crossrec.splits import Splits

    data = Dataset.load(cross_fk)
    sp = Splits(data, domains=["food"])
    vecs = torch.from_numpy(backbone_vectors(data, sp, "minilm", "", 64))
    cfg = TrainConfig(dim=32, layers=1, text_prior_decay=0.6, text_prior_cross=0.1)
    torch.manual_seed(0)
    model = CrossRecModel(cfg, 1, in_dim=vecs.shape[1]).eval()
    model.adaptor.init_from_vectors(vecs)
    with torch.no_grad():  # a tower that is not the identity
        for p in model.tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
        item_vecs = model.item_vectors(vecs)
    retriever = Retriever(model, sp, item_vecs, ["food"])
    fit_priors(retriever, ["popularity", "transition"])
    path = tmp_path_factory.mktemp("adapt") / "food"
    save_bundle(
        path,
        BundleContents(
            model,
            cfg,
            ["food"],
            bundle_items(data, sp, item_vecs),
            {},
            data.content_hash,
            in_dim=vecs.shape[1],
            priors=retriever.priors,
        ),
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def adapted(food_bundle, cross_fk, tmp_path_factory):
    from crossrec.adapt import adapt_bundle
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset

    out = tmp_path_factory.mktemp("adapt") / "food+kitchen"
    res = adapt_bundle(food_bundle, Dataset.load(cross_fk), ["kitchen"], out, min_targets=1)  # a tiny slice
    return res, load_bundle(out)


def _evaluate(bundle, data, domains, tmp_path, capsys):
    from crossrec_cli import main

    out = tmp_path / f"eval-{bundle.path.name}-{'-'.join(domains)}.json"
    rc = main(
        ["evaluate", "--bundle", str(bundle.path), "--data", str(data), "--domains", ",".join(domains)]
        + ["--baselines", "popularity", "--json", str(out), "--quiet"]
    )
    assert rc == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_the_adapted_bundle_stores_what_adapt_chose_and_evaluation_reproduces_it(adapted, cross_fk, tmp_path, capsys):
    res, b2 = adapted
    assert b2.domains == ["food"] and b2.catalog_domains == ["food", "kitchen"]
    entry = b2.meta["adapted"]["kitchen"]
    assert entry["calibration"]["learned_weight"] == res.params["learned_weight"]
    assert entry["calibration"]["text_prior_decay"] == res.params["text_prior_decay"]
    assert res.n_valid["kitchen"] > 0 and res.n_train["kitchen"] > 0
    # Kitchen's popularity prior was refitted and weighed on kitchen's validation targets; food's stayed.
    assert "kitchen" in b2.meta["pop_prior"]["weights"] or "popularity" not in res.uses["kitchen"]
    doc, printed = _evaluate(b2, cross_fk, ["kitchen"], tmp_path, capsys)
    assert "adapted: kitchen" in printed and "zero-shot" not in printed
    assert doc["zero_shot_domains"] == [] and doc["adapted_domains"] == ["kitchen"]
    assert "crossrec-as-trained" not in doc["metrics"]  # nothing calibrated at evaluation
    # The stored bundle (priors by item id, calibration from bundle.json) scores as adapt's in-memory retriever did.
    assert doc["metrics"]["crossrec"]["kitchen"]["ndcg@10"] == pytest.approx(res.test["kitchen"]["ndcg@10"], abs=1e-9)


def test_the_bundles_own_domain_answers_as_before(food_bundle, adapted, cross_fk, tmp_path, capsys):
    _, b2 = adapted
    before, _ = _evaluate(food_bundle, cross_fk, ["food"], tmp_path, capsys)
    after, _ = _evaluate(b2, cross_fk, ["food"], tmp_path, capsys)
    assert after["metrics"]["crossrec"] == before["metrics"]["crossrec"]


def test_the_recommender_answers_in_the_new_domain_and_the_old_bundle_refuses_it(food_bundle, adapted):
    from crossrec.recommender import HistoryItem, Recommender

    _, b2 = adapted
    food_item = food_bundle.item_matrix("food")[0][0]
    got = Recommender.load(b2).recommend([HistoryItem("food", food_item)], "kitchen", k=5, explain=True)
    assert len(got) == 5 and all(r.domain == "kitchen" for r in got)
    assert {r.item_id for r in got} <= set(b2.item_matrix("kitchen")[0])
    with pytest.raises(Exception, match="kitchen"):
        Recommender.load(food_bundle).recommend([HistoryItem("food", food_item)], "kitchen", k=5)


def test_a_new_domain_without_logs_gets_text_only(food_bundle, cross_fk, tmp_path, capsys):
    """The slice with every kitchen interaction removed (kitchen items kept): nothing to choose on."""
    from crossrec.dataset import Dataset, prepare
    from crossrec_cli import main

    full = Dataset.load(cross_fk)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "domain", "title"])
        w.writeheader()
        w.writerows({k: it[k] for k in ("item_id", "domain", "title")} for it in full.items.to_pylist())
    inters = [r for r in full.interactions.to_pylist() if r["domain"] == "food"]
    with open(src / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["user_id", "item_id", "domain", "timestamp"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("user_id", "item_id", "domain", "timestamp")} for r in inters)
    prepare([src], tmp_path / "data", progress=False)
    out = tmp_path / "b2"
    rc = main(
        [
            "adapt",
            "--bundle",
            str(food_bundle.path),
            "--data",
            str(tmp_path / "data"),
            "--domains",
            "kitchen",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "kitchen: 0 training interactions, 0 validation targets; scores with text\n" in printed
    assert "kitchen: no validation targets (0 training interactions): text only" in printed
    from crossrec.bundle import load_bundle

    b2 = load_bundle(out)
    assert b2.meta["adapted"]["kitchen"]["uses"] == ["text"]
    assert b2.calibration["kitchen"].learned_weight == 0.0
    assert main(["inspect", str(out)]) == 0
    assert "adapted  kitchen (crossrec adapt on" in capsys.readouterr().out
    assert "kitchen" not in b2.meta["pop_prior"]["weights"]


def test_adapt_refuses_a_trained_domain_an_unknown_one_and_its_own_folder(food_bundle, cross_fk, tmp_path, capsys):
    from crossrec_cli import main

    base = ["adapt", "--bundle", str(food_bundle.path), "--data", str(cross_fk), "--quiet"]
    assert main([*base, "--domains", "food", "--out", str(tmp_path / "x")]) == 2
    assert "the model trained on food" in capsys.readouterr().err
    assert main([*base, "--domains", "garden", "--out", str(tmp_path / "x")]) == 2
    assert "'garden' is not a domain of the dataset" in capsys.readouterr().err
    assert main([*base, "--domains", "kitchen", "--out", str(food_bundle.path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_domain_with_fewer_validation_targets_than_min_targets_gets_text_only(
    food_bundle, adapted, cross_fk, tmp_path, capsys
):
    """Weights chosen on a handful of targets follow noise: below --min-targets nothing is chosen or fitted."""
    from crossrec.bundle import load_bundle
    from crossrec_cli import main

    res, _ = adapted
    n = res.n_valid["kitchen"]
    base = ["adapt", "--bundle", str(food_bundle.path), "--data", str(cross_fk), "--domains", "kitchen", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "b0"), "--min-targets", "0"]) == 2
    assert "--min-targets must be >= 1" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b2"), "--min-targets", str(n + 1)]) == 0
    printed = capsys.readouterr().out
    assert f"kitchen: {n} validation targets, fewer than the {n + 1} a choice of weights needs" in printed
    assert "chosen on validation" not in printed
    b2 = load_bundle(tmp_path / "b2")
    assert b2.meta["adapted"]["kitchen"]["uses"] == ["text"] and b2.calibration["kitchen"].learned_weight == 0.0
    assert "kitchen" not in b2.meta["pop_prior"]["weights"]
    assert b2.meta["adapted"]["kitchen"]["test"]["n_targets"] > 0  # still measured on its test targets
