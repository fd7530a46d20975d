import json
import subprocess
import sys

import numpy as np
import pytest

from crossrec_cli import main


def test_evaluate_popularity_writes_design_json(art_office, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(["evaluate", "--baselines", "popularity", "--data", str(art_office), "--json", str(out), "--quiet"]) == 0
    )
    printed = capsys.readouterr().out
    assert "arts  (150 targets)" in printed and "popularity" in printed
    res = json.loads(out.read_text())
    assert res["bundle"] is None and res["dataset"] == str(art_office)
    assert set(res["metrics"]["popularity"]) == {"arts", "office", "all"}
    assert set(res["metrics"]["popularity"]["all"]) == {
        f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (10, 20, 50)
    }
    # Leave-one-out never has a user new to the domain (they have their own protocol): no empty slice for them.
    assert set(res["slices"]["popularity"]["arts"]) == {"cold_item"}
    assert res["protocol"]["protocol"] == "leave-one-out" and res["protocol"]["min_per_domain"] == 3


def test_evaluate_bad_arguments_exit_nonzero_with_one_line(art_office, capsys):
    assert main(["evaluate", "--data", str(art_office), "--domains", "toys", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"crossrec evaluate: error: --domains: unknown domain 'toys' (domains in {art_office}: arts, office)\n"
    )
    assert main(["evaluate", "--data", str(art_office / "nope")]) == 2
    assert "not a prepared crossrec dataset" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "crossrec_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" in r.stdout and "evaluate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "crossrec_cli", "prepare", "--help"], capture_output=True, text=True)
    assert "--identity" in r.stdout and "atomically" in r.stdout


def test_recommended_config_loads_the_measured_pipeline():
    import yaml

    from crossrec.config import DEFAULT_CONFIG, NAMED_CONFIGS, TrainConfig, config_to_dict, default_config, load_config
    from crossrec_cli.options import RECOMMENDED

    cfg = load_config(RECOMMENDED)
    assert cfg.graph.enabled and cfg.fusion == "attention" and cfg.ranker.enabled and cfg.mode == "cached"
    assert cfg.text_prior_decay is None  # chosen on each dataset's validation split
    # The documented file is the built-in `recommended`, key for key, and that is what no --config trains.
    assert yaml.safe_load(RECOMMENDED.read_text()) == NAMED_CONFIGS["recommended"] and DEFAULT_CONFIG == "recommended"
    assert config_to_dict(load_config("recommended")) == config_to_dict(cfg) == config_to_dict(default_config()[0])
    assert default_config()[1] is None
    # `basic` is TrainConfig's own defaults (text vectors only, no graph, no ranker), as is no config at all.
    assert config_to_dict(load_config("basic")) == config_to_dict(TrainConfig()) == config_to_dict(load_config())
    with pytest.raises(ValueError, match=r"--config nope: no such file \(built-in configs: basic, recommended\)"):
        load_config("nope")


def test_the_default_falls_back_where_recommended_does_not_apply():
    """Graph + attention fusion need cached text vectors: without --config, end-to-end, id items and a warm start
    from a bundle without side vectors train `basic` + the ranker, and say so; an explicit `recommended` (or a
    graph the user sets) keeps the error."""
    from crossrec.config import config_to_dict, default_config, load_config

    for sets, why in (
        (["mode=end-to-end"], "`mode` end-to-end"),
        (["item_encoder=id", "lr=0.01"], "`item_encoder` id"),
    ):
        cfg, note = default_config(sets)
        assert config_to_dict(cfg) == config_to_dict(load_config("basic", ["ranker.enabled=true", *sets]))
        assert why in note and "training `basic` + the ranker" in note and note.count("\n") == 0
    cfg, note = default_config(["init_from=pre"], {"side_dims": None})
    assert not cfg.graph.enabled and cfg.ranker.enabled and "`init_from` pre (a bundle without graph" in note
    cfg, note = default_config(["init_from=pre"], {"side_dims": [384]})  # a graph bundle: the fusion carries over
    assert cfg.graph.enabled and cfg.fusion == "attention" and note is None
    fuse = r"`graph.enabled` and `feature_columns` fuse side vectors with cached text vectors"
    with pytest.raises(ValueError, match=fuse):
        load_config("recommended", ["mode=end-to-end"])
    with pytest.raises(ValueError, match=fuse):
        default_config(["item_encoder=id", "graph.enabled=true"])
    with pytest.raises(ValueError, match=r"`mode` must be one of cached, end-to-end, got 'fast'"):
        load_config("recommended", ["mode=fast"])


def test_train_without_config_on_id_items_trains_basic_with_the_ranker(
    ray_cluster, vector_cache, tiny_fk, tiny_bundle, tmp_path, capsys
):
    """`crossrec train --set item_encoder=id` (no --config): one printed line, then `basic` + the ranker (the ranker
    re-orders an ID retriever's top-N too); `--config recommended` with the same setting exits 2."""
    from crossrec.bundle import load_bundle
    from crossrec.config import TrainConfig

    out = tmp_path / "id"
    fast = ["epochs=1", "dim=32", "layers=1", "batch_size=32", "n_negatives=16", "valid_max_targets=50"]
    fast += ["item_encoder=id", "ranker.epochs=1", "ranker.top_n=20", "ranker.patience=0"]
    argv = ["train", "--data", str(tiny_fk), "--out", str(out), "--workers", "1", "--quiet"]
    assert main([*argv, *[x for kv in fast for x in ("--set", kv)]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("default config: `recommended`") == 1 and "`item_encoder` id" in printed
    cfg = json.loads((out / "bundle.json").read_text())["config"]
    assert cfg["item_encoder"] == "id" and not cfg["graph"]["enabled"] and cfg["fusion"] == "concat"
    assert cfg["patience"] == TrainConfig().patience and cfg["ranker"]["enabled"]
    assert load_bundle(out).has_ranker and (out / "ranker" / "model.safetensors").is_file()
    # An explicit `recommended` does not fall back: the error names the settings.
    assert main([*argv[:4], str(tmp_path / "b"), "--config", "recommended", "--set", "item_encoder=id"]) == 2
    assert "fuse side vectors with cached text vectors" in capsys.readouterr().err
    # A warm start from a text-only bundle (tiny_bundle) falls back too, said before anything runs.
    assert (
        main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c"), "--init", str(tiny_bundle)]) == 2
    )
    got = capsys.readouterr()
    assert f"`init_from` {tiny_bundle} (a bundle without graph/feature vectors)" in got.out
    assert "not a prepared crossrec dataset" in got.err


def test_help_config_lists_every_settable_key_with_default_and_doc(capsys):
    import dataclasses

    from crossrec.config import TrainConfig, load_config

    with pytest.raises(SystemExit) as done:
        main(["train", "--help-config"])  # before --data/--out are required
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    listed = {line.split(" = ")[0].strip(): line for line in lines}

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f

    expected = dict(keys(TrainConfig))
    assert set(listed) == set(expected) - {"side_dims"}  # derived: not listed, not settable
    for key, f in expected.items():
        assert f.metadata.get("doc"), f"{key} has no doc"
        if key in listed:
            assert f.metadata["doc"] in listed[key]
    assert "lora.rank = 8" in listed["lora.rank"] and "backbone_grad_items = 32" in listed["backbone_grad_items"]
    with pytest.raises(ValueError, match=r"`side_dims` is set by training \(derived from the data\), not a setting"):
        load_config(overrides=["side_dims=[8]"])


@pytest.fixture(scope="module")
def tiny_bundle(ray_cluster, vector_cache, tiny_fk, tmp_path_factory):
    from crossrec.config import RunSettings, load_config
    from trainers.pipeline import train_bundle

    out = tmp_path_factory.mktemp("cli") / "b"
    train_bundle(
        tiny_fk,
        out,
        load_config(overrides=["epochs=2", "dim=32", "layers=1", "valid_max_targets=0"]),
        RunSettings(workers=1, name="cli-tiny"),
        progress=False,
    )
    return out


def test_recommend_query_json_parses_and_follows_the_query(tiny_bundle, capsys):
    """`recommend --query TEXT --json`: JSON in the HTTP answer's shape; the query (and a text history entry)
    are embedded by the bundle's backbone, so another query gives other items."""
    out = tiny_bundle
    answers = {}
    for query in ("stainless steel chef knife", "dark roast coffee beans"):
        assert (
            main(
                [
                    "recommend",
                    "--bundle",
                    str(out),
                    "--domain",
                    "kitchen",
                    "--query",
                    query,
                    "--history-text",
                    "food:organic green tea",
                    "--k",
                    "5",
                    "--json",
                ]
            )
            == 0
        )
        answers[query] = json.loads(capsys.readouterr().out)
    knife, coffee = answers.values()
    assert len(knife["items"]) == 5 and all(i["domain"] == "kitchen" for i in knife["items"])
    assert knife["history"] == [
        {"text": "organic green tea", "domain": "food"},
        {"query": "stainless steel chef knife", "domain": "kitchen"},
    ]
    assert {r["item_id"] for i in knife["items"] for r in i["reasons"]} <= {"query", "history[0]"}
    assert [i["item_id"] for i in knife["items"]] != [i["item_id"] for i in coffee["items"]]
    assert "knife" in " ".join(i["title"].lower() for i in knife["items"])
    assert main(["recommend", "--bundle", str(out), "--domain", "kitchen"]) == 2
    assert "give --history, --history-text or --query" in capsys.readouterr().err


def test_inspect_prints_what_the_bundle_holds_and_the_bundle_has_its_curves(tiny_bundle, tiny_fk, capsys):
    assert main(["inspect", str(tiny_bundle)]) == 0
    text = capsys.readouterr().out
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    for expect in (
        f"version {meta['version']}",
        "backbone minilm",
        "food (",
        "kitchen (",
        meta["data_hash"],
        "epochs=2",
        "test (full ranking)",
        "prior    popularity, weight per domain (chosen on validation): food ",
        "prior    transition, weight per domain (chosen on validation): food ",
        "torch ",
        "transformers ",
        "size ",
    ):
        assert expect in text, expect
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["libraries"]["torch"] and info["config_changed"]["epochs"] == 2 and info["total_size"] > 0
    assert (tiny_bundle / "curves.png").stat().st_size > 10_000  # loss and validation NDCG@10 per epoch
    assert main(["inspect", str(tiny_fk)]) == 2


def test_beyond_accuracy_on_a_hand_made_example():
    from crossrec.evaluation import beyond_accuracy_metrics, popularity_percentiles

    counts = np.array([0, 5, 5, 9, 1])  # training interactions of items 0..4
    # Sorted: 0, 1, 5, 5, 9 -> share strictly below, ties counted half, over n - 1.
    assert popularity_percentiles(counts).tolist() == [0.0, 62.5, 62.5, 100.0, 25.0]
    m = beyond_accuracy_metrics(np.array([[3, 1], [3, 2]]), np.array([0, 3]), counts, k=2, popular_share=0.2)
    # Items 3, 1, 2 recommended of 5; the top 20% (one item: 3) gets 2 of the 4 recommendations.
    assert m == {
        "coverage@2": 0.6,
        "popular_share@2": 0.5,
        "rec_pop_pct@2": (100 + 62.5 + 100 + 62.5) / 4,
        "target_pop_pct": 50.0,
        "n_items": 5,
        "n_recommended": 3,
        "n_lists": 2,
    }


def test_evaluate_reports_beyond_accuracy_and_slices_and_plots(tiny_fk, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(tiny_fk),
                "--baselines",
                "popularity",
                "--json",
                str(out),
                "--plot",
                str(tmp_path / "eval.png"),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "beyond accuracy (top 10)" in printed and "slices (ndcg@10" in printed and "cold_item" in printed
    beyond = json.loads(out.read_text())["beyond_accuracy"]["popularity"]
    for d in ("food", "kitchen", "all"):
        assert set(beyond[d]) >= {"coverage@10", "popular_share@10", "rec_pop_pct@10", "target_pop_pct"}
    # Popularity recommends the 10 most popular items to everyone: they are among the top 10% (the slice's
    # catalogs have over 100 items each), and the same 10 per domain (bar history masking).
    for d in ("food", "kitchen"):
        assert beyond[d]["popular_share@10"] > 0.95  # ties at the top-10% border go by item order
        assert beyond[d]["rec_pop_pct@10"] > beyond[d]["target_pop_pct"]
        assert beyond[d]["coverage@10"] <= 20 / beyond[d]["n_items"]
    assert (tmp_path / "eval.png").stat().st_size > 10_000


@pytest.mark.slow
def test_explanations_in_words_one_bounded_sentence_per_item():
    """Five items in one batch (what `recommend --k 5 --explain-text` asks for): each a whole sentence that names
    the history item behind it, within the token bound."""
    import re

    from crossrec.explain import Explainer, short_title

    ex = Explainer(max_new_tokens=24)
    items = [
        ("pilot metropolitan fountain pen, black barrel", ["sakura pigma micron ink pen set"]),
        ("post it notes, canary yellow, 12 pads", ["moleskine ruled notebook", "highlighter set"]),
        ("Two Tier Curved Fruit Basket", ["PowerBar Harvest Energy Bars, Double Chocolate Crisp, 2.29-Ounce Bars"]),
        ("Cryopak Flexible Ice Pack for Lunch Boxes (2 pack)", ["Mae Ploy Thai Green Curry Paste - 14 oz jar"]),
        ("Pinzon Velvet Plush Throw, Chocolate", ["Japanese Kit Kat Maccha Green Tea Flavor (5 Bag)"]),
    ]
    out = ex.explain(items)
    assert len(out.texts) == 5 and out.new_tokens <= 5 * 24 and out.seconds > 0
    for text, (_, because) in zip(out.texts, items):
        assert re.fullmatch(r"[A-Z].*\w[)\"']?[.!?]", text), text  # a whole sentence: capital ... word, end mark
        assert short_title(because[0]) in text, text


def test_sentences_are_finished_at_their_end_or_at_a_whole_word():
    from crossrec.explain import finish_sentence, short_title

    assert finish_sentence("Because you liked X, it fits. More text") == "Because you liked X, it fits."
    # A decimal point is no sentence end; the bound cuts at the last whole word, connectives dropped.
    assert finish_sentence("Because you liked 2.29 oz bars, the snack and the bo", cut=True) == (
        "Because you liked 2.29 oz bars, the snack."
    )
    assert finish_sentence("Because you liked X, a match") == "Because you liked X, a match."  # ended by EOS
    assert short_title("PowerBar Harvest Energy Bars, Double Chocolate Crisp") == "PowerBar Harvest Energy Bars"
    assert short_title("Mae Ploy Thai Green Curry Paste - 14 oz jar") == "Mae Ploy Thai Green Curry Paste"


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["trian", "--data", "d"], "(did you mean train?)"),
        (["evaluate", "--data", "d", "--baslines", "popularity"], "(did you mean --baselines?)"),
        (["jobs", "logs", "ID", "--folow"], "(did you mean --follow?)"),
        (["demo", "--dataset", "amazon-food-kitchn"], "(did you mean amazon-food-kitchen?)"),
    ],
)
def test_a_misspelt_command_option_or_choice_gets_a_suggestion(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(hint), err


def test_recommend_accepts_explain_and_no_explain():
    from crossrec_cli import build_parser

    base = ["recommend", "--bundle", "b", "--domain", "d", "--history", "i"]
    parser = build_parser()
    assert parser.parse_args([*base, "--explain"]).explain is True  # was ambiguous with --explain-text/-tokens
    assert parser.parse_args(base).explain is True and parser.parse_args([*base, "--no-explain"]).explain is False
    assert parser.parse_args([*base, "--explain-text"]).explain_text is True
