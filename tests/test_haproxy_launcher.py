"""The pieces of `crossrec serve`'s HAProxy launcher that need no Ray: listeners rewritten on a config as Ray 2.60
renders it, the start-up sweep (kills only processes running a config in its own state folder), the state lock,
and the parent-death signal of a launched process. The whole serve: tests/test_serve_lifecycle.py (slow)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.haproxy_launcher import HAProxySettings, ServeState, rewrite_listeners

# The listener sections of Ray Serve 2.60's HAProxy template (haproxy_templates.py), rendered.
RAY_CONFIG = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
    no log
frontend http_frontend
    bind 127.0.0.1:8000
    default_backend default_backend
frontend grpc_frontend
    bind *:9000 proto h2
backend default_backend
    http-request return status 404
listen stats
  bind *:8404
  stats enable
  stats uri /stats
  stats refresh 1s
"""


@pytest.fixture
def short_tmp():
    """A short folder under /tmp: HAProxy's unix socket paths live under a serve's state folder."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="x", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _binds(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("bind ")]


def test_stats_and_prometheus_are_off_by_default_and_every_bind_is_on_the_host():
    out = rewrite_listeners(RAY_CONFIG, HAProxySettings("127.0.0.1"))
    assert _binds(out) == ["bind 127.0.0.1:8000", "bind 127.0.0.1:9000 proto h2"]
    assert "frontend prometheus" not in out and "listen stats" not in out and "stats enable" not in out
    assert "backend default_backend" in out and "stats socket" in out  # the admin socket Serve talks to stays


def test_stats_and_prometheus_on_the_host_at_the_ports_asked_for():
    out = rewrite_listeners(RAY_CONFIG, HAProxySettings("127.0.0.1", stats_port=18404, metrics_port=19101))
    assert _binds(out) == [
        "bind 127.0.0.1:19101",
        "bind 127.0.0.1:8000",
        "bind 127.0.0.1:9000 proto h2",
        "bind 127.0.0.1:18404",
    ]


def test_a_wildcard_host_keeps_wildcard_binds():
    out = rewrite_listeners(RAY_CONFIG, HAProxySettings("0.0.0.0"))
    assert "bind *:9000 proto h2" in _binds(out)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _fake_haproxy(config: Path) -> subprocess.Popen:
    """A process whose command line is `... -f CONFIG` (what the sweep reads), started in its own group."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "-f", str(config)], start_new_session=True
    )


def test_the_sweep_kills_only_haproxy_of_its_own_state_folder(short_tmp):
    state = ServeState("127.0.0.1", 8000, root=short_tmp)
    ours = _fake_haproxy(state.dir / ("a" * 56) / "haproxy.cfg")
    other = _fake_haproxy(short_tmp / "elsewhere" / "haproxy.cfg")  # recorded, but not a config of this folder
    try:
        state.pids.write_text(f"{ours.pid}\n{other.pid}\n999999999\n")
        time.sleep(0.2)  # the children have exec'ed (their command line is readable)
        assert state.sweep() == [ours.pid]
        assert ours.wait(10) == -signal.SIGKILL
        assert other.poll() is None
        assert state.pids.read_text() == ""
    finally:
        for p in (ours, other):
            if p.poll() is None:
                p.kill()
                p.wait()
        state.close()


def test_a_second_serve_of_the_same_host_and_port_is_refused_while_the_first_holds_it(short_tmp):
    first = ServeState("127.0.0.1", 8000, root=short_tmp)
    with pytest.raises(
        RuntimeError, match=rf"port 8000 on 127.0.0.1 is in use \(another crossrec serve, pid {os.getpid()}\)"
    ):
        ServeState("127.0.0.1", 8000, root=short_tmp)
    ServeState("127.0.0.2", 8000, root=short_tmp).close()  # another host: another folder
    first.close()
    ServeState("127.0.0.1", 8000, root=short_tmp).close()


def test_a_launched_process_dies_with_its_parent(short_tmp):
    """The launcher as Serve runs it (env from ServeState.env, `-f CONFIG`), with a `sleep` as the real binary,
    under a parent that is then SIGKILLed: the child goes too (PR_SET_PDEATHSIG), and its pid was recorded."""
    state = ServeState("127.0.0.1", 8000, root=short_tmp)
    config = state.dir / "node" / "haproxy.cfg"
    config.parent.mkdir()
    config.write_text(RAY_CONFIG)
    fake = short_tmp / "fake-haproxy"  # takes HAProxy's arguments, runs as a plain process
    fake.write_text("#!/bin/sh\nexec /bin/sleep 120\n")
    fake.chmod(0o755)
    env = {**os.environ, **state.env(HAProxySettings("127.0.0.1"), str(fake))}
    # The parent starts the launcher as Serve does, prints the child's pid, waits.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "p = subprocess.Popen([sys.argv[1], '-db', '-f', sys.argv[2]]); "
            "print(p.pid, flush=True); time.sleep(120)",
            env["RAY_SERVE_HAPROXY_BINARY_PATH"],
            str(config),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 20
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"/bin/sleep":
            assert time.monotonic() < deadline, "the launcher did not exec the real binary"
            time.sleep(0.1)
        assert state.pids.read_text().split() == [str(child)]
        assert _binds(config.read_text()) == ["bind 127.0.0.1:8000", "bind 127.0.0.1:9000 proto h2"]
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the launched process outlived its parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
        state.close()
