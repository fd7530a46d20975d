"""`crossrec serve`: the Ray Serve graph over HTTP until Ctrl-C or SIGTERM (`serving` imports Ray Serve, so
only when this runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossrec_cli.options import UsageError

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    from crossrec.bundle import bundle_meta

    bundle = Path(args.bundle)
    bundle_meta(bundle, "--bundle")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config: {args.config} not found")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    import os

    import ray

    from serving.app import FAST_PATH_ENV, serve_until_stopped
    from trainers.runtime import init_ray

    # Serve's throughput-optimised path and HAProxy are read when Ray starts, in every Ray process: set them first.
    os.environ.update({k: v for k, v in FAST_PATH_ENV.items() if k not in os.environ})
    init_ray()  # the embedded local Ray, or $RAY_ADDRESS
    try:
        serve_until_stopped(bundle, args.host, args.port, args.config, state_dir=args.state)
    finally:
        ray.shutdown()  # serving shuts Serve down; Ray belongs to this command
    return 0


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
    sp.set_defaults(func=cmd_serve)
