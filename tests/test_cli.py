import json
import subprocess
import sys

from crossrec_cli import main


def test_evaluate_popularity_writes_design_json(art_office, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--baselines", "popularity", "--data", str(art_office), "--json", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "arts  (150 targets)" in printed and "popularity" in printed
    res = json.loads(out.read_text())
    assert res["bundle"] is None and res["dataset"] == str(art_office)
    assert set(res["metrics"]["popularity"]) == {"arts", "office", "all"}
    assert set(res["metrics"]["popularity"]["all"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr")
                                                        for k in (10, 20, 50)}
    assert res["slices"]["popularity"]["arts"]["cold_user"]["n"] == 0


def test_evaluate_bad_arguments_exit_nonzero_with_one_line(art_office, capsys):
    assert main(["evaluate", "--data", str(art_office), "--domains", "toys", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == "crossrec evaluate: error: --domains: unknown domain 'toys' (domains in " \
                  f"{art_office}: arts, office)\n"
    assert main(["evaluate", "--data", str(art_office / "nope")]) == 2
    assert "not a prepared crossrec dataset" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "crossrec_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" in r.stdout and "evaluate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "crossrec_cli", "prepare", "--help"], capture_output=True, text=True)
    assert "--identity" in r.stdout and "atomically" in r.stdout


def test_recommended_config_loads_the_measured_pipeline():
    from crossrec_cli.options import RECOMMENDED
    from crossrec.config import load_config

    cfg = load_config(RECOMMENDED)
    assert cfg.graph.enabled and cfg.fusion == "attention" and cfg.ranker.enabled and cfg.mode == "cached"
    assert cfg.text_prior_decay is None  # chosen on each dataset's validation split


def test_help_config_lists_every_settable_key_with_default_and_doc(capsys):
    import dataclasses

    import pytest

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
