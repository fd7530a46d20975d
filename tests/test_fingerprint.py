"""Run fingerprints (data hash + config): a re-run into the same run or --out with other data or config exits 2
naming what differs, unless --resume / --force says what the user wants. No Ray: every refusal comes before it."""

import json

import pytest

from crossrec.config import config_to_dict, load_config
from crossrec.dataset import Dataset
from crossrec.fingerprint import RunConflict, check_run, fingerprint, read_fingerprint, write_fingerprint
from crossrec_cli import main


def _fp(data_hash="a" * 64, *overrides):
    return fingerprint(data_hash, config_to_dict(load_config(overrides=list(overrides))))


def test_check_run_decides_and_names_what_differs():
    old = _fp("a" * 64, "lr=0.001")
    assert check_run(None, old, "run x", started=False) == "new"
    assert check_run(old, _fp("a" * 64, "lr=0.001", "epochs=9"), "run x") == "continue"  # longer: same run
    with pytest.raises(
        RunConflict,
        match=r"run x was started with a different config \(lr 0\.001 -> 0\.01\): "
        r"pass --force to start over",
    ):
        check_run(old, _fp("a" * 64, "lr=0.01"), "run x")
    with pytest.raises(RunConflict, match=r"with other data \(data hash aaaaaaaa -> bbbbbbbb; lr 0\.001 -> 0\.01\)"):
        check_run(old, _fp("b" * 64, "lr=0.01"), "run x", resume=True)  # --resume never mixes two runs
    with pytest.raises(RunConflict, match=r"lora\.rank 8 -> 4"):
        check_run(old, _fp("a" * 64, "lr=0.001", "lora.rank=4"), "run x")
    assert check_run(old, _fp("b" * 64), "run x", force=True) == "restart"
    with pytest.raises(RunConflict, match="--resume: run x holds no run to continue"):
        check_run(None, old, "run x", resume=True, started=False)
    with pytest.raises(RunConflict, match="without a fingerprint"):
        check_run(None, old, "run x", started=True)


def test_fingerprint_round_trips_through_a_folder(tmp_path):
    fp = _fp("c" * 64, "lora.rank=4")
    write_fingerprint(str(tmp_path / "run"), fp)
    assert read_fingerprint(str(tmp_path / "run")) == fp
    assert read_fingerprint(f"file://{tmp_path / 'run'}") == fp and read_fingerprint(str(tmp_path)) is None
    assert fp["config"]["lora.rank"] == 4 and "epochs" not in fp["config"]


def test_train_into_another_runs_folder_exits_2_naming_the_difference(tiny_fk, tiny_ao, tmp_path, capsys):
    runs = tmp_path / "runs"
    # A run that was started on tiny_fk with lr 0.001 (its fingerprint, as train_bundle records it first).
    write_fingerprint(
        str(runs / "r1"),
        fingerprint(Dataset.load(tiny_fk).content_hash, config_to_dict(load_config(overrides=["lr=0.001"]))),
    )
    (runs / "r1" / "checkpoint_000001").mkdir()
    base = [
        "train",
        "--config",
        "basic",
        "--out",
        str(tmp_path / "b"),
        "--storage",
        str(runs),
        "--name",
        "r1",
        "--quiet",
    ]
    assert main([*base, "--data", str(tiny_fk), "--set", "lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "was started with a different config (lr 0.001 -> 0.01)" in err and err.count("\n") == 1
    assert main([*base, "--data", str(tiny_ao), "--set", "lr=0.001", "--resume"]) == 2
    assert "was started with other data (data hash" in capsys.readouterr().err
    assert json.loads((runs / "r1" / "crossrec_fingerprint.json").read_text())["config"]["lr"] == 0.001
    assert not (tmp_path / "b").exists()


def test_train_refuses_to_overwrite_an_existing_out(tiny_fk, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "bundle.json").write_text(json.dumps({"data_hash": "f" * 64}))
    assert main(["train", "--data", str(tiny_fk), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists" in err and "--resume" in err and "--force" in err
    assert json.loads((out / "bundle.json").read_text()) == {"data_hash": "f" * 64}
