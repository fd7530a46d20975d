"""Ray Jobs API client behind `crossrec submit` and `crossrec jobs`.

A submitted job runs `python -m crossrec_cli SUBCOMMAND ARGS` on the cluster's head node with the head's own
interpreter, found on the head by `trainers/job_entry.py` (never the `python` of the head's PATH), after a pre-flight
job has checked that this interpreter has crossrec's dependencies (one line naming what is missing otherwise). It
runs in a runtime env that
uploads this checkout: the repository root as `working_dir` (trainers/, serving/, tune_configs/, the vendored
data/) and the core package `platform/crossrec` as a `py_module`, so the job runs exactly the code that was
submitted. Dependencies are not shipped (no `pip` by default): cluster nodes have crossrec's pinned environment
from `cluster.yaml`'s setup commands. Relative paths in ARGS resolve inside the uploaded copy, which Ray deletes
with the job, so outputs (`--out`, `--json`, `--storage`) must be absolute paths on storage the nodes share, or URIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO

from ray.exceptions import AuthenticationError  # ray
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient  # ray

import crossrec

__all__ = [
    "JobsError",
    "auth_token",
    "runtime_env",
    "client",
    "submit",
    "follow",
    "exit_code",
    "list_jobs",
    "format_jobs",
    "job_info",
    "job_logs",
    "stop_job",
    "report",
    "repo_root",
    "entrypoint",
    "preflight",
]

# What a job never needs: caches, environments, local outputs (Ray also honours .gitignore / .rayignore).
EXCLUDES = [".git", ".venv", "out", "build", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".ray_tmp"]
# The job's first process: started by the job supervisor's own binary (`/proc/$PPID/exe`: Linux heads), it picks
# the head's interpreter and runs crossrec with it (trainers/job_entry.py). Relative to the uploaded working_dir.
ENTRY = "trainers/job_entry.py"
# Every job: Train V2 (what trainers/ are written for) and no model hub (backbones come from installed packages).
JOB_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class JobsError(ValueError):
    """A job could not be submitted or queried: one line, for the CLI."""


# Where Ray's token auth looks for the cluster's token, in this order (Ray 2.60; `ray get-auth-token` prints it).
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_WHERE = f"${TOKEN_ENV}, the file named by ${TOKEN_PATH_ENV}, or ~/.ray/auth_token"


def auth_token() -> tuple[str | None, str]:
    """(the token this machine is configured with, where it came from), as Ray looks for it: $RAY_AUTH_TOKEN,
    else the file at $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. (None, "") when there is none."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        return None, ""
    return (token, str(path)) if token else (None, "")


def _auth_headers() -> dict[str, str]:
    """The token, when one is configured, sent whether or not this process runs Ray in token mode (Ray's SDK adds
    it only then); a head without token auth ignores it."""
    token, _ = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_message(address: str, error: str) -> str:
    token, where = auth_token()
    if token is None:
        return (
            f"the Jobs API at {address} requires Ray's token auth and no token is configured here: put the "
            f"cluster's token (`ray get-auth-token` on the head) in {TOKEN_WHERE}"
        )
    return (
        f"the Jobs API at {address} refused the token from {where} ({error}): put the cluster's token "
        f"(`ray get-auth-token` on the head) in {TOKEN_WHERE}"
    )


def repo_root() -> Path:
    """The checkout this code runs from (holds pyproject.toml, trainers/ and platform/crossrec/)."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / "pyproject.toml").is_file() and (root / "platform" / "crossrec").is_dir()):
        raise JobsError(
            f"{root} is not a crossrec checkout (crossrec is installed without its sources): pass "
            f"--working-dir CHECKOUT"
        )
    return root


def runtime_env(
    working_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    excludes: list[str] | None = None,
    pip: list[str] | None = None,
) -> dict:
    """The job's runtime env: this checkout uploaded (working_dir + the core package), JOB_ENV plus `env`."""
    root = Path(working_dir).resolve() if working_dir else repo_root()
    core = root / "platform" / "crossrec"
    if not core.is_dir():
        raise JobsError(f"--working-dir {root}: no platform/crossrec in it (not a crossrec checkout)")
    renv = {
        "working_dir": str(root),
        "py_modules": [str(core)],
        "excludes": [*EXCLUDES, *(excludes or [])],
        "env_vars": {**JOB_ENV, **(env or {})},
    }
    if pip:
        renv["pip"] = list(pip)
    return renv


def entrypoint(argv: list[str], python: str | None = None, check: bool = False) -> str:
    """The job's shell command: job_entry.py run by the supervisor's interpreter, `--python` when one is given."""
    launcher = '"$(readlink -f /proc/$PPID/exe 2>/dev/null || command -v python3 || command -v python)"'
    flags = (["--python", python] if python else []) + (["--check"] if check else [])
    return f"exec {launcher} {shlex.join([ENTRY, *flags, '--', *argv])}"


def preflight(
    c: JobSubmissionClient, renv: dict, python: str | None = None, sid: str | None = None, timeout_s: float = 300
) -> str:
    """Runs the pre-flight job (job_entry.py --check) and returns the head's interpreter it found; a head that
    cannot run crossrec raises JobsError with the check's one line (e.g. the interpreter has no pyarrow)."""
    sid = f"{sid or 'crossrec'}-check-{secrets.token_hex(2)}"
    _submit(c, entrypoint([], python, check=True), renv, sid, {"crossrec": crossrec.__version__, "command": "check"})
    deadline = time.monotonic() + timeout_s
    while not (info := job_info(c, sid)).status.is_terminal():
        if time.monotonic() > deadline:
            stop_job(c, sid)
            raise JobsError(f"the pre-flight check on the head ({sid}) did not end within {timeout_s:.0f}s")
        time.sleep(0.5)
    lines = [ln.strip() for ln in job_logs(c, sid).splitlines() if ln.strip().startswith("crossrec job:")]
    if info.status == JobStatus.SUCCEEDED and lines:
        return lines[-1].split("crossrec job: python ", 1)[-1]
    if lines:
        raise JobsError(lines[-1].split("error: ", 1)[-1])
    first = (info.message or str(info.status)).strip().splitlines()[0]
    raise JobsError(f"the pre-flight check on the head ({sid}) {info.status}: {first}")


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster given: pass --address http://HEAD:8265 (the head's dashboard) or set RAY_ADDRESS")
    return address


@contextlib.contextmanager
def _errors(what: str, address: str | None = None) -> Iterator[None]:
    """The SDK's multi-line RuntimeError / ConnectionError -> one line naming what failed; an authentication
    failure -> one line saying where the token is expected."""
    try:
        yield
    except (RuntimeError, ConnectionError, AuthenticationError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = lines[0] if lines else type(e).__name__
        if isinstance(e, AuthenticationError) or "authentication token" in str(e).lower():
            first = next((ln for ln in lines if "authentication token" in ln.lower()), first)
            raise JobsError(_auth_message(address or "the head", first)) from None
        raise JobsError(f"{what}: {first}") from None


class _DropNotices(logging.Filter):
    """Ray's notices that .git/.venv are no longer uploaded: crossrec excludes them on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


def _quiet_sdk_logs() -> None:
    """The SDK logs each upload step at INFO (files skipped, package already there, socket closed): keep its
    warnings and errors only, so the output is the job's."""
    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.job.sdk",
    ):
        log = logging.getLogger(name)
        log.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropNotices) for f in log.filters):
            log.addFilter(_DropNotices())


def client(address: str | None = None) -> JobSubmissionClient:
    address = _address(address)
    _quiet_sdk_logs()
    with _errors(f"cannot reach the Jobs API at {address} (is the dashboard up on the head?)", address):
        return JobSubmissionClient(address, headers=_auth_headers())


def submit(
    address: str | None,
    argv: list[str],
    *,
    working_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    excludes: list[str] | None = None,
    pip: list[str] | None = None,
    python: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_gpus: float | None = None,
    check: bool = True,
) -> tuple[JobSubmissionClient, str]:
    """Submits `crossrec ARGV` as a job; returns (the client, the submission id). ARGV is run as given: the CLI
    checks it with its own parser first (`crossrec_cli.cluster.job_argv`). `python`: the interpreter on the head
    (default: the one running the head's Ray, found there); `check`: run the pre-flight job first and submit
    with the interpreter it found."""
    renv = runtime_env(working_dir, env, excludes, pip)
    sid = submission_id or f"crossrec-{argv[0]}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    c = client(address)
    if check:
        python = preflight(c, renv, python, sid)
    _submit(
        c,
        entrypoint(argv, python),
        renv,
        sid,
        {"crossrec": crossrec.__version__, "command": argv[0]},
        entrypoint_num_gpus,
    )
    return c, sid


def _submit(
    c: JobSubmissionClient, command: str, renv: dict, sid: str, metadata: dict, num_gpus: float | None = None
) -> str:
    # A head that has just started answers "No available agent to submit job" until its job agent is up:
    # that one error is retried for up to a minute; every other error is final.
    deadline = time.monotonic() + 60
    while True:
        try:
            with _errors("submission failed", c.get_address()):
                return c.submit_job(
                    entrypoint=command,
                    runtime_env=renv,
                    submission_id=sid,
                    entrypoint_num_gpus=num_gpus,
                    metadata=metadata,
                )
        except JobsError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


# Lines Ray writes into every job's log before the command's own output: its INFO line and the entrypoint (here the
# launcher's shell line, not what the user typed). `crossrec jobs logs` (without --follow) keeps them.
_RAY_JOB_PREAMBLE = re.compile(
    r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO job_manager\.py:\d+ -- Runtime env is setting up\.$|^Running entrypoint for job "
)


async def _tail(c: JobSubmissionClient, job_id: str, out: TextIO) -> int:
    n, partial = 0, ""
    async for chunk in c.tail_job_logs(job_id):
        *lines, partial = (partial + chunk).split("\n")
        kept = [ln + "\n" for ln in lines if not _RAY_JOB_PREAMBLE.search(ln)]
        out.write("".join(kept))
        out.flush()
        n += len(chunk)
    if partial:
        out.write(partial)
    return n


def follow(
    c: JobSubmissionClient, job_id: str, out: TextIO | None = None, err: TextIO | None = None, poll_s: float = 1.0
) -> JobStatus:
    """Streams the job's logs to `out` (stdout) until it ends; then writes its final status (and, if it did not
    succeed, Ray's reason) to `err` (stderr) and returns the status."""
    out, err = out or sys.stdout, err or sys.stderr
    streamed = 0
    try:
        streamed = asyncio.run(_tail(c, job_id, out))
    except RuntimeError as e:  # the log stream closed early: keep waiting for the status
        print(f"(log stream interrupted: {str(e).splitlines()[0]}; waiting for the job to end)", file=err)
    while not (info := job_info(c, job_id)).status.is_terminal():
        time.sleep(poll_s)
    report(info, err, full=streamed == 0)
    return info.status


def report(info, err: TextIO | None = None, full: bool = True) -> None:
    """One status line; for a job that did not succeed, Ray's message (whole, or its first line when the logs
    were already shown: Ray repeats their tail in it)."""
    err = err or sys.stderr
    line = f"job {info.submission_id} {info.status}"
    if info.start_time and info.end_time:
        line += f" after {(info.end_time - info.start_time) / 1000:.0f}s"
    print(line, file=err)
    if info.status != JobStatus.SUCCEEDED and info.message:
        msg = info.message.rstrip()
        print(msg if full else msg.splitlines()[0].split(", last available logs")[0], file=err)


def exit_code(status: JobStatus) -> int:
    """0 for a job that succeeded or is still going, 1 for one that failed or was stopped."""
    return 1 if status in (JobStatus.FAILED, JobStatus.STOPPED) else 0


def job_info(c: JobSubmissionClient, job_id: str):
    with _errors(f"job {job_id}", c.get_address()):
        return c.get_job_info(job_id)


def job_logs(c: JobSubmissionClient, job_id: str) -> str:
    with _errors(f"job {job_id}", c.get_address()):
        return c.get_job_logs(job_id)


def stop_job(c: JobSubmissionClient, job_id: str, wait_s: float = 0, poll_s: float = 1.0):
    """Asks the job to stop; with wait_s, waits up to that long for it to end. Returns its JobInfo."""
    with _errors(f"job {job_id}", c.get_address()):
        c.stop_job(job_id)
    deadline = time.time() + wait_s
    while not (info := job_info(c, job_id)).status.is_terminal() and time.time() < deadline:
        time.sleep(poll_s)
    return info


def list_jobs(c: JobSubmissionClient) -> list[JobDetails]:
    """Submitted jobs (not drivers that connected directly, nor pre-flight checks that passed), oldest first."""
    with _errors("listing jobs", c.get_address()):
        jobs = c.list_jobs()

    def shown(j: JobDetails) -> bool:
        passed_check = (j.metadata or {}).get("command") == "check" and j.status == JobStatus.SUCCEEDED
        return bool(j.submission_id) and not passed_check

    return sorted(filter(shown, jobs), key=lambda j: j.start_time or 0)


def format_jobs(jobs: list[JobDetails], width: int = 70) -> str:
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "TIME", "ENTRYPOINT")]
    for j in jobs:
        started = datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        end = j.end_time or (time.time() * 1000 if j.start_time else None)
        took = f"{(end - j.start_time) / 1000:.0f}s" if j.start_time and end else "-"
        entry = j.entrypoint
        if ENTRY in entry:  # the launcher is noise: show what a user would type
            rest = entry.split(ENTRY, 1)[1]
            entry = "crossrec " + rest.split(" -- ", 1)[1] if " -- " in rest else "crossrec pre-flight check"
        elif " -m crossrec_cli " in entry:  # submitted by an older crossrec
            entry = "crossrec " + entry.split(" -m crossrec_cli ", 1)[1]
        rows.append(
            (
                j.submission_id,
                str(j.status),
                started,
                took,
                entry if len(entry) <= width else entry[: width - 3] + "...",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
