"""Publishing and input hygiene of `crossrec prepare`, through the real command in real subprocesses: a concurrent
writer is refused, SIGKILL at every publish step leaves the target whole, bad names and encodings are refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crossrec.atomic import PAUSE_ENV, PUBLISH_STEPS
from crossrec.dataset import Dataset

DATA = Path(__file__).parent / "data"
AO, FK = DATA / "amazon-art-office-mini", DATA / "amazon-food-kitchen-mini"


def _prepare(src: Path, out: Path, *extra: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: pause} if pause else {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "crossrec_cli", "prepare", str(src), "--out", str(out), "--quiet", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _paused(p: subprocess.Popen, step: str) -> None:
    """Waits until `p` stopped itself at `step`."""
    for line in p.stderr:
        if f"paused at {step} (pid {p.pid})" in line:
            return
    raise AssertionError(f"prepare never paused at {step}: rc={p.wait()}")


def _run(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    p = _prepare(src, out, *extra)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def test_a_concurrent_prepare_to_the_same_out_is_refused_with_one_line(tmp_path):
    out = tmp_path / "ds"
    first = _prepare(AO, out, pause="locked")
    _paused(first, "locked")
    second = _run(FK, out, "--force")
    assert second.returncode == 2
    assert second.stderr == (
        f"crossrec prepare: error: {out} is being written by another process "
        f"(pid {first.pid}); wait for it to finish, or write elsewhere\n"
    )
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert Dataset.load(out).domains == ["arts", "office"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no lock file, no temporary folder


def test_two_racing_prepares_give_exactly_one_success(tmp_path):
    out = tmp_path / "ds"
    procs = [_prepare(src, out) for src in (AO, FK)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.count("\n") == 1 and ("being written by another process" in err or "already exists" in err), err


@pytest.mark.slow  # about 40 s: six real prepares, five of them killed
def test_sigkill_at_each_publish_step_never_leaves_the_target_missing(tmp_path):
    # One target per step, all killed writers run at once (the test stays short on a small machine).
    assert _run(AO, tmp_path / "v1").returncode == 0
    old = Dataset.load(tmp_path / "v1").content_hash
    assert _run(FK, tmp_path / "v2").returncode == 0
    new = Dataset.load(tmp_path / "v2").content_hash
    outs = {step: tmp_path / step for step in PUBLISH_STEPS}
    for out in outs.values():
        shutil.copytree(tmp_path / "v1", out)
    procs = {step: _prepare(FK, out, "--force", pause=step) for step, out in outs.items()}
    for step, p in procs.items():
        _paused(p, step)
        p.kill()  # SIGKILL
        p.wait()
    for step, out in outs.items():
        ds = Dataset.load(out)  # whole: the manifest and every table load
        before_swap = PUBLISH_STEPS.index(step) < PUBLISH_STEPS.index("swapped")
        assert ds.content_hash == (old if before_swap else new), step
        assert ds.domains == (["arts", "office"] if before_swap else ["food", "kitchen"])
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert any(".tmp-" in n for n in leftovers)  # the killed writers did leave garbage
    # The next writer of a target removes what the killed ones left beside it (temporary and old folders, the lock).
    out = outs["swapped"]
    assert any(n.startswith(f".{out.name}.") for n in leftovers)
    r = _run(AO, out, "--force")
    assert r.returncode == 0, r.stderr
    assert Dataset.load(out).content_hash == old
    assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())


@pytest.mark.parametrize("domain", ["../x", "a/b"])
def test_domain_names_that_are_not_plain_names_are_refused(tmp_path, domain):
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text(f"item_id,domain,title\ni1,books,a\ni2,{domain},b\n", encoding="utf-8")
    (src / "interactions.csv").write_text("user_id,item_id,domain,timestamp\nu1,i1,books,1\n", encoding="utf-8")
    r = _run(src, tmp_path / "out" / "ds")
    assert r.returncode == 2
    assert r.stderr == (
        f"crossrec prepare: error: {src / 'items.csv'}: column 'domain' row 2: domain {domain!r} "
        "must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ without '..'\n"
    )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "x").exists()


def test_domain_option_is_checked_too(tmp_path):
    r = _run(DATA / "recbole-mini" / "food.inter", tmp_path / "ds", "--domain", "../x")
    assert r.returncode == 2
    assert r.stderr == (
        "crossrec prepare: error: --domain: domain '../x' must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ without '..'\n"
    )


def test_a_byte_order_mark_keeps_leading_zeros(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_bytes("\ufeffitem_id,domain,title\n0001,books,a\n0002,books,b\n".encode())
    (src / "interactions.csv").write_bytes(
        "\ufeffuser_id,item_id,domain,timestamp\n007,0001,books,1\n007,0002,books,2\n".encode()
    )
    assert _run(src, tmp_path / "ds").returncode == 0
    ds = Dataset.load(tmp_path / "ds")
    assert ds.items.column("item_id").to_pylist() == ["0001", "0002"]
    assert ds.interactions.column("item_id").to_pylist() == ["0001", "0002"]
    assert set(ds.interactions.column("user_id").to_pylist()) == {"007"}


def test_text_that_is_not_utf8_is_named_by_file_column_and_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_bytes(b"item_id,domain,title\ni1,books,a\ni2,books,caf\xe9 au lait\n")
    (src / "interactions.csv").write_text("user_id,item_id,domain,timestamp\nu1,i1,books,1\n")
    r = _run(src, tmp_path / "ds")
    assert r.returncode == 2
    assert r.stderr == (
        f"crossrec prepare: error: {src / 'items.csv'}: column 'title' row 2: not UTF-8 text "
        "(byte 0xe9); save the file as UTF-8\n"
    )
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "items.jsonl").write_bytes(
        b'{"item_id": "i1", "domain": "books", "title": "a"}\n'
        b'{"item_id": "i2", "domain": "books", "title": "caf\xe9"}\n'
    )
    (jsonl / "interactions.jsonl").write_text('{"user_id": "u1", "item_id": "i1", "domain": "books", "timestamp": 1}\n')
    r = _run(jsonl, tmp_path / "ds2")
    assert r.returncode == 2 and r.stderr.startswith(
        f"crossrec prepare: error: {jsonl / 'items.jsonl'}: row 2: not UTF-8 text"
    ), r.stderr


@pytest.mark.parametrize("domain", ["..", ".hidden", "-x", "a" * 65, "a b", "x..y"])
def test_more_bad_domain_names_in_process(tmp_path, domain):
    from crossrec.dataset import prepare
    from crossrec.schema import DataError

    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text(f"item_id,domain,title\ni1,{domain},a\n", encoding="utf-8")
    (src / "interactions.csv").write_text(f"user_id,item_id,domain,timestamp\nu1,i1,{domain},1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"items.csv: column 'domain' row 1: domain .* must match"):
        prepare([src], tmp_path / "ds", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _tiny_bundle(path: Path, domains: list[str]) -> Path:
    import dataclasses

    import numpy as np

    from crossrec.bundle import BundleContents, save_bundle
    from crossrec.config import TrainConfig
    from crossrec.model import CrossRecModel

    cfg = dataclasses.replace(TrainConfig(), text_prior_decay=0.5, text_prior_cross=1.0)
    model = CrossRecModel(cfg, len(domains), in_dim=8, n_items=None)
    items = {d: ([f"{d}-1"], ["a title"], np.ones((1, cfg.dim))) for d in domains}
    return save_bundle(path, BundleContents(model, cfg, domains, items, {}, "datahash", in_dim=8))


def test_a_bundle_records_its_content_hash_and_refuses_changed_files(tmp_path):
    from crossrec.bundle import load_bundle, verify_bundle

    path = _tiny_bundle(tmp_path / "b", ["arts", "office"])
    h = verify_bundle(path)
    assert load_bundle(path, verify=True).content_hash == h and len(h) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no lock or temporary folder left
    with open(path / "items" / "arts.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"items/arts.parquet changed since the bundle was written"):
        load_bundle(path, verify=True)
    with pytest.raises(ValueError, match=r"`domains`: domain '\.\./x' must match"):
        _tiny_bundle(tmp_path / "c", ["arts", "../x"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "x.parquet").exists()
