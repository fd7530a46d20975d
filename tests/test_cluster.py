"""Running on a Ray cluster: `crossrec submit` / `crossrec jobs` against a real Ray head started here on 127.0.0.1
(dashboard on a free port, the Jobs API behind it), and `cluster.yaml` checked by Ray's own cluster-config
validation. The head runs in its own process group, which the test ends itself: other Ray instances on the
machine are left alone (no `ray stop`)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import _subset

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CROSSREC = [sys.executable, "-m", "crossrec_cli"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _own_processes(tmp: Path) -> list[int]:
    """Pids of our head's processes: those naming its temp dir (raylet, GCS, dashboard, workers) or inheriting its
    RAY_TMPDIR (job drivers, which Ray starts in sessions of their own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if (
                    str(tmp) in (proc / "cmdline").read_bytes().decode(errors="replace")
                    or f"RAY_TMPDIR={tmp}\0".encode() in (proc / "environ").read_bytes()
                ):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def bare_path(folder: Path) -> str:
    """A PATH whose `python` is the venv's base interpreter, which lacks crossrec's dependencies: a head started
    as `.venv/bin/ray start` from a shell without the venv activated (the job entrypoint used to run this
    `python` and fail with "No module named 'pyarrow'")."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        (folder / name).symlink_to(getattr(sys, "_base_executable", None) or shutil.which("python3"))
    return f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with the dashboard (Jobs API), 2 CPUs, its own short temp dir (unix socket paths < 108 chars),
    started from the venv's `ray` with a PATH whose `python` is not the venv's (bare_path): every job here runs
    with the head's own interpreter or fails."""
    with start_head(path=bare_path(tmp_path_factory.mktemp("bare") / "bin")) as head:
        yield head


@contextlib.contextmanager
def start_head(extra_env: dict[str, str] | None = None, path: str | None = None):
    """Starts a local Ray head (see `ray_head`) with `extra_env` (e.g. token auth); yields {"url", "env", "tmp"}.
    `path`: the head's PATH (default: the venv's bin first, an activated venv); another one starts it as
    `.venv/bin/ray start` from a shell whose `python` is not the venv's."""
    tmp = Path(tempfile.mkdtemp(prefix="crj", dir="/tmp"))
    gcs, dash, *agents = _free_ports(8)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        **(extra_env or {}),
        "RAY_TMPDIR": str(tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a test head has no traffic to drain
        # An activated venv (as on a cluster node with crossrec installed), or a PATH without one.
        "PATH": path or f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agents[0]}",
        f"--dashboard-agent-grpc-port={agents[1]}",
        f"--runtime-env-agent-port={agents[2]}",
        f"--metrics-export-port={agents[3]}",
        f"--node-manager-port={agents[4]}",
        f"--object-manager-port={agents[5]}",
        "--num-cpus=2",
        f"--object-store-memory={300 * 1024**2}",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log = open(tmp / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # up, with token auth
                    break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not come up:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "env": env, "tmp": tmp}
    finally:
        # End only what this fixture started: `ray start --block` stops its node's processes on SIGTERM; then
        # anything left in its process group or started under its temp dir (see _own_processes).
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        deadline = time.time() + 15
        while (left := _own_processes(tmp)) and time.time() < deadline:
            time.sleep(1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _crossrec(head, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in head["env"].items() if k != "RAY_TMPDIR"}
    return subprocess.run([*CROSSREC, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_prepare_and_train_jobs_follow_to_success(ray_head, food_kitchen_csv, tmp_path):
    src = _subset(food_kitchen_csv, tmp_path / "src", 60)
    url = ray_head["url"]
    prep = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--follow",
        "--",
        "prepare",
        str(src),
        "--out",
        str(tmp_path / "ds"),
        "--quiet",
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr
    job_id = prep.stdout.splitlines()[0]
    assert job_id.startswith("crossrec-prepare-")
    assert "SUCCEEDED" in prep.stderr and (tmp_path / "ds" / "manifest.json").is_file()
    assert "users" in prep.stdout  # the job's own output, streamed

    train = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--follow",
        "--env",
        f"CROSSREC_CACHE_DIR={tmp_path / 'cache'}",
        "--",
        "train",
        "--config",
        "basic",
        "--data",
        str(tmp_path / "ds"),
        "--out",
        str(tmp_path / "bundle"),
        "--set",
        "epochs=1",
        "--set",
        "dim=32",
        "--set",
        "layers=1",
        "--set",
        "batch_size=32",
        "--set",
        "valid_max_targets=0",
        "--workers",
        "1",
        "--storage",
        f"file://{tmp_path / 'runs'}",
        "--quiet",
    )
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    assert (tmp_path / "bundle" / "bundle.json").is_file() and "wrote bundle" in train.stdout
    assert any((tmp_path / "runs" / "bundle").iterdir())  # checkpoints went to the file:// storage URI
    assert (tmp_path / "cache").is_dir()  # --env reached the job

    listed = _crossrec(ray_head, "jobs", "list", "--address", url)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "crossrec prepare" in listed.stdout
    status = _crossrec(ray_head, "jobs", "status", job_id, "--address", url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout


def test_a_failing_job_exits_non_zero_with_its_error(ray_head, tmp_path):
    url = ray_head["url"]
    bad = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--follow",
        "--",
        "prepare",
        "/nonexistent/crossrec-src",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "/nonexistent/crossrec-src" in bad.stdout  # the command's own one-line error, from the job's logs
    assert "FAILED" in bad.stderr
    job_id = bad.stdout.splitlines()[0]
    status = _crossrec(ray_head, "jobs", "status", job_id, "--address", url)
    assert status.returncode == 1 and "FAILED" in status.stdout
    logs = _crossrec(ray_head, "jobs", "logs", job_id, "--address", url)
    assert "crossrec prepare: error:" in logs.stdout


def test_jobs_stop_ends_a_running_job(ray_head, tmp_path):
    url = ray_head["url"]
    # A relative input path resolves inside the uploaded checkout (the vendored data); textknn embeds its whole
    # catalog first, minutes of work, so the job is still going when it is stopped.
    sub = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--env",
        f"CROSSREC_CACHE_DIR={tmp_path / 'cache'}",
        "--",
        "evaluate",
        "--baselines",
        "textknn",
        "--data",
        "data/amazon-art-office",
        "--json",
        str(tmp_path / "b.json"),
        "--quiet",
    )
    assert sub.returncode == 0 and "crossrec jobs logs" in sub.stderr, sub.stderr
    job_id = sub.stdout.strip()
    stop = _crossrec(ray_head, "jobs", "stop", job_id, "--address", url)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    status = _crossrec(ray_head, "jobs", "status", job_id, "--address", url)
    assert status.returncode == 1 and "STOPPED" in status.stdout
    assert not (tmp_path / "b.json").exists()


def test_a_python_without_the_dependencies_fails_in_one_line_before_the_job(ray_head, tmp_path):
    """`--python` naming an interpreter without crossrec's dependencies (what the head's PATH `python` is here):
    the pre-flight job says which are missing, in one line, and the command is never submitted."""
    python = str(next(Path(p) for p in ray_head["env"]["PATH"].split(os.pathsep)) / "python")
    bad = _crossrec(
        ray_head,
        "submit",
        "--address",
        ray_head["url"],
        "--python",
        python,
        "--",
        "prepare",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout + bad.stderr
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("crossrec submit: error: the head's Python cannot run crossrec: "), err
    assert f"{python} has no " in err[0] and "pyarrow" in err[0]
    listed = _crossrec(ray_head, "jobs", "list", "--address", ray_head["url"]).stdout
    assert "crossrec prepare " + str(tmp_path / "src") not in listed  # only the check ran


@pytest.mark.slow
def test_submit_serve_runs_the_app_on_the_cluster_until_the_job_is_stopped(ray_head, tiny_fk, tmp_path):
    """`crossrec submit -- serve`: `crossrec serve` as a long-running job on the head (docs/REFERENCE.md says why
    not `serve deploy`); it answers over HTTP, and `crossrec jobs stop` shuts Serve down (port closed)."""
    url = ray_head["url"]
    train = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--follow",
        "--env",
        f"CROSSREC_CACHE_DIR={tmp_path / 'cache'}",
        "--",
        "train",
        "--config",
        "basic",
        "--data",
        str(tiny_fk),
        "--out",
        str(tmp_path / "bundle"),
        *[
            x
            for kv in ("epochs=1", "dim=32", "layers=1", "batch_size=32", "valid_max_targets=0")
            for x in ("--set", kv)
        ],
        "--workers",
        "1",
        "--storage",
        str(tmp_path / "runs"),
        "--quiet",
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    port = _free_ports(1)[0]
    sub = _crossrec(
        ray_head,
        "submit",
        "--address",
        url,
        "--",
        "serve",
        "--bundle",
        str(tmp_path / "bundle"),
        "--port",
        str(port),
        "--state",
        str(tmp_path / "state"),
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    deadline, health = time.time() + 300, None
    while health is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as r:
                health = json.loads(r.read())
        except OSError:
            time.sleep(2)
    logs = _crossrec(ray_head, "jobs", "logs", job_id, "--address", url).stdout
    assert health and health["status"] == "ok", logs[-3000:]
    # The app answers a moment before `crossrec serve` (done waiting for it) prints where it serves.
    up = f"serving bundle {health['model']} at http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while up not in logs and time.time() < deadline:
        time.sleep(2)
        logs = _crossrec(ray_head, "jobs", "logs", job_id, "--address", url).stdout
    assert up in logs, logs[-3000:]
    status = _crossrec(ray_head, "jobs", "status", job_id, "--address", url)
    assert status.returncode == 0 and "RUNNING" in status.stdout
    stop = _crossrec(ray_head, "jobs", "stop", job_id, "--address", url, "--wait", "90")
    assert f"job {job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    with pytest.raises(OSError):  # Serve shut down with its job, not left behind as a detached app
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    assert "shutting down Serve" in _crossrec(ray_head, "jobs", "logs", job_id, "--address", url).stdout


def test_bad_submissions_fail_before_reaching_the_cluster(tmp_path):
    from crossrec_cli import main

    env = {**os.environ, "RAY_ADDRESS": ""}
    rel = subprocess.run(
        [*CROSSREC, "submit", "--address", "http://127.0.0.1:9", "--", "prepare", "x", "--out", "out/x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert rel.returncode == 2 and "relative path" in rel.stderr
    assert (
        main(
            [
                "submit",
                "--address",
                "http://127.0.0.1:9",
                "--",
                "recommend",
                "--bundle",
                "b",
                "--domain",
                "d",
                "--history",
                "i",
            ]
        )
        == 2
    )
    down = subprocess.run(
        [*CROSSREC, "jobs", "list", "--address", f"http://127.0.0.1:{_free_ports(1)[0]}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert down.returncode == 2 and "cannot reach the Jobs API" in down.stderr


def test_job_argv_points_ray_commands_at_the_jobs_cluster():
    from crossrec_cli import build_parser
    from crossrec_cli.cluster import job_argv
    from trainers.jobs import runtime_env

    parser = build_parser()
    assert job_argv(["--", "train", "--data", "d", "--out", "/b"], parser)[-2:] == ["--address", "auto"]
    assert "--address" not in job_argv(["prepare", "src", "--out", "/d"], parser)
    assert (
        job_argv(["train", "--data", "d", "--out", "/b", "--address", "ray://h:10001"], parser).count("--address") == 1
    )
    from crossrec_cli.options import UsageError

    with pytest.raises(UsageError, match="submit -- serve needs --state DIR, an absolute path"):
        job_argv(["serve", "--bundle", "/b"], parser)
    with pytest.raises(UsageError, match="--state st: a relative path"):
        job_argv(["serve", "--bundle", "/b", "--state", "st"], parser)
    assert job_argv(["--", "serve", "--bundle", "/b", "--state", "/s"], parser) == [
        "serve",
        "--bundle",
        "/b",
        "--state",
        "/s",
    ]
    renv = runtime_env()
    assert renv["working_dir"] == str(REPO) and renv["py_modules"] == [str(REPO / "platform" / "crossrec")]
    assert {".venv", "out", ".git"} <= set(renv["excludes"]) and "data" not in renv["excludes"]
    assert renv["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1" and "pip" not in renv


def test_the_entrypoint_never_runs_the_python_of_the_heads_path():
    from trainers.job_entry import missing_modules
    from trainers.jobs import entrypoint

    cmd = entrypoint(["prepare", "a b", "--out", "/d"])
    assert cmd.startswith('exec "$(readlink -f /proc/$PPID/exe') and " python " not in cmd.replace("python)", "")
    assert cmd.endswith("trainers/job_entry.py -- prepare 'a b' --out /d")
    assert "--python /opt/py --check --" in entrypoint([], "/opt/py", check=True)
    assert missing_modules(sys.executable) == []  # this venv has every dependency (and the checkout)
    base = getattr(sys, "_base_executable", sys.executable)
    if base != sys.executable and "pyarrow" in (bare := missing_modules(base)):
        assert {"ray", "torch"} <= set(bare)
    assert "cannot run /nonexistent/python" in missing_modules("/nonexistent/python")


# -- cluster.yaml ------------------------------------------------------------------------------------------
def _validate(config: dict) -> None:
    """What `ray up` checks before it touches a cloud: defaults merged (prepare_config), then the schema and the
    node-type rules (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > t["min_workers"] for t in types.values())
    assert any(t["resources"].get("GPU", 0) == 0 and n != config["head_node_type"] for n, t in types.items())
    # The Jobs API runs whatever it is sent: only on the head's loopback (reached through `ray dashboard`'s SSH
    # tunnel), and with Ray's token auth on every node, the token shipped to each.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize(
    "breakage",
    [
        "no provider",
        "unknown node-type field",
        "head type not a node type",
        "min workers above the cluster bound",
        "fractional GPU count",
    ],
)
def test_a_broken_cluster_yaml_fails_rays_validation(breakage):
    import jsonschema

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    worker = next(n for n in config["available_node_types"] if n != config["head_node_type"])
    if breakage == "no provider":
        del config["provider"]
    elif breakage == "unknown node-type field":
        config["available_node_types"][worker]["max_worker"] = 3  # a typo of max_workers
    elif breakage == "head type not a node type":
        config["head_node_type"] = "no-such-type"
    elif breakage == "min workers above the cluster bound":
        config["available_node_types"][worker]["min_workers"] = config["max_workers"] + 1
    else:
        config["available_node_types"][worker]["resources"]["GPU"] = 0.5
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        _validate(config)
