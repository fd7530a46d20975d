"""The entrypoint of every crossrec job: runs `python -m crossrec_cli ARGS` with the head's own interpreter, never
whatever `python` the head's PATH holds (a head started as `.venv/bin/ray start` without an activated venv has
none, or one without crossrec's dependencies: "No module named 'pyarrow'").

Standard library only: it is started by the real binary of the job's supervisor (`/proc/$PPID/exe`, which for a
venv is the base interpreter, without the venv's packages) and finds the interpreter whose site-packages hold the
Ray that runs the supervisor (its loaded `_raylet` library names them): the venv's `bin/python`, or the base
interpreter itself. `--python PATH` overrides the search. Before running the command it checks that the chosen
interpreter has crossrec's dependencies and fails with one line naming the missing ones; `--check` does only that
(`crossrec submit` runs it first, as a pre-flight job).

    python trainers/job_entry.py [--python PATH] [--check] -- SUBCOMMAND ARGS...
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# Import names of crossrec's runtime dependencies (pyproject.toml) and of crossrec itself (the uploaded checkout).
REQUIRED = ("ray", "pyarrow", "numpy", "torch", "transformers", "peft", "yaml", "safetensors", "crossrec", "serving")
PREFIX = "crossrec job"


def head_python(parent: int | None = None) -> str:
    """The interpreter that runs the head's Ray. An activated venv's ($VIRTUAL_ENV: a head started from an
    activated venv, or the env Ray builds for `--pip`); else found from the `_raylet` library the supervisor
    process (our parent) has loaded, `<prefix>/lib/pythonX.Y/site-packages/ray/_raylet*.so` ->
    `<prefix>/bin/python`, when that is a venv (pyvenv.cfg) or the very binary the supervisor runs; else the
    supervisor's binary (this one)."""
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and os.access(os.path.join(venv, "bin", "python"), os.X_OK):
        return os.path.join(venv, "bin", "python")
    parent = parent or os.getppid()
    try:
        with open(f"/proc/{parent}/maps") as f:
            raylet = next((m.group(0) for line in f if (m := re.search(r"/\S*/ray/_raylet\S*\.so", line))), None)
        binary = os.path.realpath(f"/proc/{parent}/exe")
    except OSError:  # no /proc (not Linux): the interpreter running this script
        return sys.executable
    if raylet and "/lib/python" in raylet:
        prefix = raylet.split("/lib/python", 1)[0]
        for name in ("python", "python3"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK) and (
                os.path.isfile(os.path.join(prefix, "pyvenv.cfg")) or os.path.realpath(candidate) == binary
            ):
                return candidate
    return sys.executable


def missing_modules(python: str) -> list[str] | str:
    """REQUIRED modules `python` cannot find (found without importing them: a second at most), or, when `python`
    does not run at all, why."""
    code = f"import importlib.util as u, sys; print(','.join(m for m in {REQUIRED!r} if u.find_spec(m) is None))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"cannot run {python} ({e.strerror})"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return f"{python} failed: {last}"
    return [m for m in out.stdout.strip().split(",") if m]


def main(argv: list[str]) -> int:
    python, check, args = None, False, list(argv)
    while args and args[0] != "--":
        flag = args.pop(0)
        if flag == "--python" and args:
            python = args.pop(0)
        elif flag == "--check":
            check = True
        else:
            print(f"{PREFIX}: error: unknown option {flag!r} (usage: {__doc__.strip().splitlines()[-1].strip()})")
            return 2
    args = args[1:]
    python = python or head_python()
    missing = missing_modules(python)
    if isinstance(missing, str) or missing:
        what = missing if isinstance(missing, str) else f"{python} has no {', '.join(missing)}"
        print(
            f"{PREFIX}: error: the head's Python cannot run crossrec: {what} (install crossrec's dependencies "
            f"on the cluster's nodes, or pass --python PATH to an interpreter that has them, or --pip)",
            flush=True,
        )
        return 2
    if check:
        print(f"{PREFIX}: python {python}", flush=True)
        return 0
    os.execv(python, [python, "-m", "crossrec_cli", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
