"""What `crossrec serve` gives Ray Serve as its HAProxy binary (RAY_SERVE_HAPROXY_BINARY_PATH), and the
per-serve state it runs in.

Serve starts HAProxy as a child of its HAProxyManager actor, in that actor's process group. Ray cleans it up
only while the raylet lives (it kills a dead worker's process group): when the raylet and the actor die
together (SIGKILL of the serve, a crash, the OOM killer) HAProxy is re-parented to init and keeps its ports.
So each HAProxy runs through `main` below, which, in the forked child before exec:

- asks the kernel for SIGKILL when its parent (the manager's thread that spawned it) dies (PR_SET_PDEATHSIG):
  no process has to survive to clean up, which is why this is the mechanism and not a supervisor;
- records its pid in this serve's state folder, so the next `crossrec serve` on the same host and port kills
  what a missed signal left (only pids whose command line names a config in that folder: never by name);
- rewrites the listeners of Ray's generated config: HAProxy's stats page and Prometheus exporter, which Ray
  binds on every interface at fixed ports (8404, 9101), are removed (default) or bound on the serve's host
  at the ports asked for; any other wildcard bind goes to the serve's host.

Stdlib only: it runs as `python -I` in the actor's child, on nothing but this file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HAProxySettings", "ServeState", "main"]

# Read by `main` in the HAProxy child (set by ServeState.env in the serve's environment before Ray starts).
ENV_REAL = "CROSSREC_HAPROXY_REAL_BINARY"
ENV_HOST = "CROSSREC_HAPROXY_HOST"
ENV_STATS = "CROSSREC_HAPROXY_STATS_PORT"
ENV_METRICS = "CROSSREC_HAPROXY_METRICS_PORT"
ENV_PIDS = "CROSSREC_HAPROXY_PIDS"

SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|userlist|peers|resolvers|program|cache|ring)\b")
WILDCARD = ("", "*", "0.0.0.0", "::", "[::]")
# HAProxy refuses a longer unix socket path in `log` (measured: 97 works, 98 does not); Serve puts metrics.sock
# under STATE/<56-hex node id>/, so the state folder's path is kept short.
SOCKET_PATH_MAX = 97


@dataclass(frozen=True)
class HAProxySettings:
    """Where HAProxy's listeners go: the serve's host; stats and Prometheus ports (0 = off)."""

    host: str
    stats_port: int = 0  # HAProxy's stats page (Ray binds *:8404 when left to itself)
    metrics_port: int = 0  # HAProxy's Prometheus exporter (Ray binds *:9101 when left to itself)


class ServeState:
    """The state folder of one `crossrec serve` (host, port): HAProxy's config, sockets, logs and pid list.
    Holding it (an exclusive lock, released by the kernel when the serve dies, even by SIGKILL) means no live
    serve uses it, so any HAProxy recorded in it is left over and is killed here."""

    def __init__(self, host: str, port: int, root: str | Path | None = None):
        uid = os.getuid()
        base = Path(root) if root is not None else Path("/tmp") / f"crx-{uid}"
        self.dir = base / f"{port}-{hashlib.sha1(host.encode()).hexdigest()[:4]}"
        if len(str(self.dir)) + 1 + 56 + len("/metrics.sock") > SOCKET_PATH_MAX:
            raise ValueError(f"serve state folder {self.dir} is too long for HAProxy's unix sockets")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pids = self.dir / "haproxy.pids"
        self._lock = open(self.dir / "serve.lock", "a+")  # noqa: SIM115  # held for the serve's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "?"
            self._lock.close()
            raise RuntimeError(f"port {port} on {host} is in use (another crossrec serve, pid {owner})") from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def sweep(self) -> list[int]:
        """Kills the HAProxy processes a previous serve of this state folder left; returns their pids."""
        killed = []
        for pid in _recorded(self.pids):
            if _runs_config_under(pid, self.dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        self.pids.write_text("")
        return killed

    def env(self, settings: HAProxySettings, real_binary: str) -> dict[str, str]:
        """The environment Ray's processes need (set before Ray starts): Serve's HAProxy paths in this folder,
        this file as its binary, the listeners' settings."""
        launcher = self.dir / "haproxy"
        launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I "{Path(__file__).resolve()}" "$@"\n')
        launcher.chmod(0o755)
        d = str(self.dir)
        env = {
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{d}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{d}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": d,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{d}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{d}/metrics.sock",
            ENV_REAL: real_binary,
            ENV_HOST: settings.host,
            ENV_STATS: str(settings.stats_port),
            ENV_METRICS: str(settings.metrics_port),
            ENV_PIDS: str(self.pids),
        }
        if settings.stats_port:
            env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(settings.stats_port)
        if settings.metrics_port:
            env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(settings.metrics_port)
        return env

    def alerts(self) -> list[str]:
        """HAProxy's [ALERT] lines (it failed to start or to reload) in this serve's logs, oldest first."""
        out = []
        for log in sorted(self.dir.glob("*/admin.sock.*.stderr.log"), key=lambda p: p.stat().st_mtime):
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            out += [line.strip() for line in text.splitlines() if "[ALERT]" in line]
        return out

    def close(self) -> None:
        self._lock.close()


def _recorded(pids: Path) -> list[int]:
    try:
        lines = pids.read_text().split()
    except FileNotFoundError:
        return []
    return [int(p) for p in lines if p.isdigit()]


def _runs_config_under(pid: int, folder: Path) -> bool:
    """Whether `pid` is an HAProxy of ours: its command line has `-f CONFIG` with CONFIG in `folder` (a
    recycled pid, or any other HAProxy on the machine, does not)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    configs = [argv[i + 1].decode(errors="replace") for i, a in enumerate(argv[:-1]) if a == b"-f"]
    return any(Path(c).parent.parent == folder or Path(c).parent == folder for c in configs)


def rewrite_listeners(text: str, settings: HAProxySettings) -> str:
    """Ray's generated config with its stats and Prometheus sections removed (port 0) or bound on the serve's
    host, and every other wildcard bind on the serve's host."""
    host = settings.host
    out: list[str] = []
    section = ""
    for line in text.splitlines(keepends=True):
        m = SECTION.match(line)
        if m:
            section = line.split("#")[0].strip()
        port = {"frontend prometheus": settings.metrics_port, "listen stats": settings.stats_port}.get(section)
        if port == 0:
            continue  # the whole section: off
        stripped = line.lstrip()
        if stripped.startswith("bind "):
            indent = line[: len(line) - len(stripped)]
            address, *rest = stripped[len("bind ") :].split(None, 1)
            tail = f" {rest[0].rstrip()}" if rest else ""
            where, _, bind_port = address.rpartition(":")
            if port is not None:
                line = f"{indent}bind {host}:{port}{tail}\n"
            elif where in WILDCARD and host not in WILDCARD:
                line = f"{indent}bind {host}:{bind_port}{tail}\n"
        out.append(line)
    return "".join(out)


def _set_parent_death_signal(sig: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _fail(message: str) -> None:
    # HAProxy's own format: Serve shows this file's stderr when HAProxy dies, and `crossrec serve` reports
    # [ALERT] lines.
    print(f"[ALERT]    ({os.getpid()}) : crossrec haproxy launcher: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str]) -> None:
    """Runs as `haproxy ARGS` in the HAProxyManager's child: parent-death signal, pid recorded, listeners
    rewritten, then exec of the real HAProxy with the same arguments (same pid: Serve tracks it)."""
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if parent == 1 or os.getppid() != parent:  # the parent died before the signal was armed
        _fail("parent exited before HAProxy started")
    env = os.environ
    try:
        real, pids = env[ENV_REAL], env[ENV_PIDS]
        settings = HAProxySettings(env[ENV_HOST], int(env[ENV_STATS]), int(env[ENV_METRICS]))
    except (KeyError, ValueError) as e:
        _fail(f"environment not set by crossrec serve ({e})")
        return
    if "-f" not in argv[:-1]:
        _fail(f"no -f CONFIG in {argv}")
    config = argv[argv.index("-f") + 1]
    with open(config + ".lock", "w") as lock:  # the lock Serve takes while it writes the config
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = Path(config).read_text()
        new = rewrite_listeners(text, settings)
        if new != text:
            tmp = Path(f"{config}.{os.getpid()}.tmp")
            tmp.write_text(new)
            os.replace(tmp, config)
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.execv(real, [real, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
