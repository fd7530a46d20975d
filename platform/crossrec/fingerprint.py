"""What a run was started with, so a re-run into the same place can tell a continuation from a different run.

A fingerprint is the dataset's content hash plus the config, flattened to dotted keys. `crossrec train` keeps one
in its run folder (`RUN_FILE`, beside Ray Train's checkpoints) and `crossrec tune` one in its `sweep.json`; a
re-run compares them with `check_run` and refuses a mismatch naming what differs, unless the user said what they
want: `resume` (continue; only with the same fingerprint) or `force` (start over).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "RUN_FILE",
    "RUN_LENGTH_KEYS",
    "RunConflict",
    "fingerprint",
    "differences",
    "check_run",
    "read_fingerprint",
    "write_fingerprint",
    "has_run",
    "clear_run",
]

RUN_FILE = "crossrec_fingerprint.json"
# How long a run goes, not what it learns: raising `epochs` and re-running continues the same run.
RUN_LENGTH_KEYS = ("epochs", "max_steps", "patience")


class RunConflict(ValueError):
    """A re-run that would mix two different runs: one line, exit code 2 in the CLI."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k in sorted(d):
        out.update(_flat(d[k], f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def fingerprint(data_hash: str, config: dict, ignore: tuple[str, ...] = RUN_LENGTH_KEYS) -> dict:
    """{"data_hash": ..., "config": {dotted key: value}} with JSON values (tuples become lists)."""
    flat = {k: v for k, v in _flat(json.loads(json.dumps(config))).items() if k not in ignore}
    return {"data_hash": data_hash, "config": flat}


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """What changed from `old` to `new`, one phrase each: "data hash 3f2a1b4c -> 9e8d7c6b", "lr 0.001 -> 0.003"."""
    out = []
    if old.get("data_hash") != new.get("data_hash"):
        out.append(f"data hash {str(old.get('data_hash'))[:8]} -> {str(new.get('data_hash'))[:8]}")
    a, b = old.get("config", {}), new.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key} {_short(a.get(key, '<unset>'))} -> {_short(b.get(key, '<unset>'))}")
    return out


def check_run(
    saved: dict | None,
    current: dict,
    where: str,
    resume: bool = False,
    force: bool = False,
    started: bool = True,
    remedy: str = "pass --force to start over, or another --name / --out",
    config_name: str = "config",
) -> str:
    """Decides what a run into `where` does: "new" (nothing there), "continue" (same fingerprint), "restart"
    (force: the caller clears `where`). Raises RunConflict naming what differs, then `remedy`, for a different
    fingerprint without `force`, and for `resume` of a run that does not exist. `started`: `where` holds a run."""
    if force:
        return "restart" if started or saved else "new"
    if not started and saved is None:
        if resume:
            raise RunConflict(f"--resume: {where} holds no run to continue")
        return "new"
    if saved is None:
        raise RunConflict(f"{where} holds a run without a fingerprint (an older crossrec): {remedy}")
    diff = differences(saved, current)
    if diff:
        what = "other data" if diff[0].startswith("data hash") else f"a different {config_name}"
        shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise RunConflict(f"{where} was started with {what} ({shown}): {remedy}")
    return "continue"


def read_fingerprint(folder: str) -> dict | None:
    """The fingerprint in `folder` (a path or a URI: pyarrow's filesystems), or None."""
    fs, path = _fs(folder)
    try:
        with fs.open_input_stream(f"{path}/{RUN_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def write_fingerprint(folder: str, fp: dict) -> None:
    fs, path = _fs(folder)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{RUN_FILE}") as f:
        f.write((json.dumps(fp, indent=1, sort_keys=True) + "\n").encode())


def has_run(folder: str) -> bool:
    """`folder` exists and holds something (Ray Train's checkpoints, its state)."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = _fs(folder)
    if fs.get_file_info(path).type != FileType.Directory:
        return False
    return any(i.base_name != RUN_FILE for i in fs.get_file_info(FileSelector(path)))


def clear_run(folder: str) -> None:
    from pyarrow.fs import FileType

    fs, path = _fs(folder)
    if fs.get_file_info(path).type == FileType.Directory:
        fs.delete_dir(path)


def _fs(folder: str):
    from pyarrow.fs import FileSystem, LocalFileSystem

    if "://" in str(folder):
        return FileSystem.from_uri(str(folder))
    return LocalFileSystem(), str(folder)
