"""The app builder that binds the serving graph to one bundle, and deploying it on a connected Ray.

    serve run serving.app:build_app bundle=out/bundle          # import path + typed args
    serve run serving/serve_config.yaml                         # the shipped config (edit its user_config)
    crossrec serve --bundle out/bundle [--config FILE.yaml] [--state DIR]   # serve_until_stopped() below

The bundle reaches the deployments as `user_config` ({"bundle": PATH}), never as an app argument: Serve
derives an app's code version from its import path and args, so a new bundle in `user_config` alone keeps
every replica alive and hands it the bundle through `reconfigure` (loaded beside the old one, swapped at
once; deployments.py). `deploy(new_bundle)` is therefore a rollout in place: no replica stops, no request
is dropped. (A new bundle passed as an arg would restart every replica, stop first, then start.)

Nothing here starts Ray: the caller connects first (`crossrec serve` runs its own Ray start-up, tests and the
bench call `ray.init`). Serve's throughput-optimised mode is read from the environment of the processes Ray
starts, so `FAST_PATH_ENV` must be in `os.environ` before Ray starts (docs/RESULTS.md "Serve's fast paths").
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application

from crossrec.bundle import served_domains
from crossrec.recommender import EXPLAIN_HISTORY
from serving.deployments import Encoder, Recommender

__all__ = [
    "AppArgs",
    "build_app",
    "APP_NAME",
    "DEFAULT_STATE_DIR",
    "FAST_PATH_ENV",
    "default_config",
    "deploy",
    "wait_ready",
    "shutdown",
    "example_body",
    "curl_line",
    "serve_until_stopped",
    "serve_once",
    "ServeStartError",
]

APP_NAME = "crossrec"
DEFAULT_STATE_DIR = "out/serve-state"  # relative to the working folder of whoever deploys (made absolute there)

# Serve's throughput-optimised mode (Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED: direct ingress, gRPC between replicas, user
# code and router on the replica's one event loop, buffered request logs, GC frozen after start) with HAProxy in front
# of the ingress replicas instead of the Python proxy: the fastest setting measured here (docs/RESULTS.md "Serve's fast
# paths"). Ray reads these when its processes start: set them before `ray.init`. An ingress replica that stops waits out
# a draining period meant for an external load balancer to deregister it (30 s by default, which every shutdown then
# takes); HAProxy here is Serve's own and is told at once.
FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


class ServeStartError(RuntimeError):
    """Serve cannot come up (HAProxy failed, the app failed to deploy): a one-line reason for the operator."""


class AppArgs(BaseModel):
    """Arguments of the app (`args:` in the Serve config, `key=value` after `serve run serving.app:build_app`)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(
        None,
        description="a bundle folder written by `crossrec train`; leave it out "
        "when a Serve config gives each deployment user_config.bundle",
    )
    state_dir: str | None = Field(
        None,
        description="folder of the log of items added online (replayed when a "
        f"replica starts); default: {DEFAULT_STATE_DIR} in the "
        "working folder",
    )
    max_online_items: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="items POST /v1/items may add beyond the bundle's catalog; past it the API answers 409",
    )
    explain_history: int = Field(
        EXPLAIN_HISTORY,
        ge=1,
        le=500,
        description="most recent history entries that `explain` weighs (each costs a "
        "pass of the user tower and of the ranker)",
    )
    text_cache: int = Field(
        2048, ge=0, le=1_000_000, description="texts whose vectors each Recommender replica keeps (no Encoder call)"
    )

    @field_validator("bundle")
    @classmethod
    def _is_bundle(cls, value: str | None) -> str | None:
        return None if value is None else bundle_path(value, "bundle")

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else state_path(value)


def bundle_path(value: str | Path, field: str) -> str:
    """The absolute path of a bundle folder (replicas need not share the caller's working directory)."""
    path = Path(value).expanduser().resolve()
    if not (path / "bundle.json").is_file():
        raise ValueError(f"`{field}`: {value} is not a crossrec bundle (no bundle.json)")
    return str(path)


def state_path(value: str | Path, field: str = "state_dir") -> str:
    """The absolute path of a state folder, created now so that a path that cannot be one fails here."""
    path = Path(value).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"`{field}`: cannot create {value} ({e.strerror})") from None
    return str(path)


DEPLOYMENTS = ("Encoder", "Recommender")


def build_app(args: AppArgs) -> Application:
    """The Encoder bound once, its handle passed to the Recommender (ingress, retrieval, ranker, explanations)."""
    if isinstance(args, dict):  # `serve run ... bundle=X` passes a dict when the annotation is not resolved
        args = AppArgs(**args)
    opts = {} if args.bundle is None else {"user_config": {"bundle": args.bundle}}
    settings = {
        "state_dir": args.state_dir or state_path(DEFAULT_STATE_DIR),
        "max_online_items": args.max_online_items,
        "explain_history": args.explain_history,
        "text_cache": args.text_cache,
    }
    encoder = Encoder.options(**opts).bind()
    return Recommender.options(**opts).bind(encoder, settings)


def default_config() -> Path:
    """The Serve config YAML shipped with the package."""
    return Path(str(resources.files("serving") / "serve_config.yaml"))


def _schema(config: str | Path, bundle: str, host: str, port: int, state_dir: str | Path | None = None):
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    raw = yaml.safe_load(Path(config).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    apps = [a for a in schema.applications if a.import_path == "serving.app:build_app"]
    if len(apps) != 1:
        raise ValueError(
            f"{config}: expected one application with import_path serving.app:build_app, found {len(apps)}"
        )
    app = apps[0]
    # The bundle goes to every deployment's user_config and never into args (see the module docstring).
    app.args = {k: v for k, v in (app.args or {}).items() if k != "bundle"}
    # Made absolute here, in the caller's working folder: the app is built in a Ray task that has another one.
    app.args["state_dir"] = state_path(state_dir or app.args.get("state_dir") or DEFAULT_STATE_DIR)
    AppArgs(**app.args)  # unknown or bad args fail here, naming the field, not inside a Ray task
    user_config = {"bundle": bundle_path(bundle, "bundle")}
    given = {d.name: d for d in app.deployments}
    unknown = sorted(set(given) - set(DEPLOYMENTS))
    if unknown:
        raise ValueError(f"{config}: unknown deployment {unknown[0]!r} (known: {', '.join(DEPLOYMENTS)})")
    # Serve applies only the options a config sets (exclude_unset): rebuild, do not copy.
    app.deployments = [
        DeploymentSchema(
            **{**(given[n].model_dump(exclude_unset=True) if n in given else {}), "name": n, "user_config": user_config}
        )
        for n in DEPLOYMENTS
    ]
    schema.http_options.host, schema.http_options.port = host, port
    return schema, app.name, app.route_prefix or "/", user_config["bundle"]


def deploy(
    bundle: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: str | Path | None = None,
    timeout_s: float = 180.0,
    state_dir: str | Path | None = None,
    failed: Callable[[], str | None] | None = None,
) -> str:
    """Deploys (or rolls out) the app from a Serve config on the connected Ray; returns the base URL once the
    given bundle answers. The same call with another bundle is a rollout without downtime. `state_dir`: the
    item log's folder (default: the config's `state_dir` arg, else DEFAULT_STATE_DIR in the working folder).
    `failed`: polled while waiting; a reason it returns stops the wait (ServeStartError)."""
    from ray.serve.context import _get_global_client  # what `serve run CONFIG.yaml` deploys through

    _require_ray()
    _quiet_driver_logs()
    schema, name, prefix, path = _schema(config or default_config(), str(bundle), host, port, state_dir)
    version = json.loads((Path(path) / "bundle.json").read_text())["version"]
    try:
        serve.start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            logging_config=schema.logging_config,
        )  # only a first start applies these (Serve's rule); waits for the proxies (HAProxy) to be ready
    except Exception as e:  # Ray's error is a remote traceback: the operator gets its cause in one line
        reason = (failed() if failed is not None else None) or _last_line(e)
        raise ServeStartError(f"Serve did not start: {reason}") from None
    _get_global_client().deploy_apps(schema, _blocking=False)
    url = f"http://{host}:{port}{prefix.rstrip('/')}"
    wait_ready(url, version, timeout_s, app=name, failed=failed)
    return url


def _quiet_driver_logs() -> None:
    """Serve's logger in this (the deploying) process logs at INFO ("Started Serve in namespace ..."): WARNING
    unless `crossrec --verbose` (CROSSREC_RAY_LOG_LEVEL), as every other Ray logger of a crossrec command."""
    logging.getLogger("ray.serve").setLevel(os.environ.get("CROSSREC_RAY_LOG_LEVEL", "WARNING"))


def wait_ready(
    url: str,
    version: str,
    timeout_s: float = 180.0,
    app: str = APP_NAME,
    failed: Callable[[], str | None] | None = None,
) -> None:
    """Until GET /v1/model answers with `version` and Serve reports the app RUNNING (no replica left to update).
    Raises ServeStartError as soon as the app fails to deploy or `failed()` gives a reason."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        reason = failed() if failed is not None else None
        if reason:
            raise ServeStartError(reason)
        status = serve.status().applications.get(app)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise ServeStartError(f"Serve could not deploy {app!r}: {status.message}")
        try:
            with urllib.request.urlopen(f"{url}/v1/model", timeout=5) as r:
                last = json.loads(r.read())["model"]
            if last == version and status is not None and status.status == "RUNNING":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}: bundle {version} not serving after {timeout_s:.0f} s (last: {last})")


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def shutdown() -> None:
    serve.shutdown()


def example_body(bundle: str | Path, n: int = 3) -> dict:
    """A valid /v1/recommend body for this bundle: the first catalog items of its first domain as history,
    recommending from its last domain (cross-domain when it has two)."""
    import pyarrow.parquet as pq

    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    first, last = meta["domains"][0], served_domains(meta)[-1]
    ids = pq.read_table(Path(bundle) / "items" / f"{first}.parquet", columns=["item_id"]).column(0)
    return {
        "history": [{"item_id": i, "domain": first} for i in ids.slice(0, n).to_pylist()],
        "domain": last,
        "k": 5,
        "explain": True,
    }


def curl_line(url: str, body: dict) -> str:
    return f"curl -s -X POST {url}/v1/recommend -H 'Content-Type: application/json' -d '{json.dumps(body)}'"


def _require_ray() -> None:
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "Ray is not initialized: connect first (ray.init(...), or crossrec's Ray start-up), "
            "with serving.app.FAST_PATH_ENV in the environment before Ray starts"
        )


def serve_until_stopped(
    bundle: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: str | Path | None = None,
    state_dir: str | Path | None = None,
    failed: Callable[[], str | None] | None = None,
) -> None:
    """`crossrec serve`: the app on the connected Ray until Ctrl-C or SIGTERM, then Serve shuts down (Ray is
    the caller's to shut down). `state_dir`: `crossrec serve --state DIR`, the item log's folder; `failed`: as
    in `deploy`."""
    import signal
    import threading

    _require_ray()
    bundle = Path(bundle)
    stop = threading.Event()
    # SIGTERM shuts down as cleanly as Ctrl-C. Installed after ray.init, which sets its own crash handler for
    # SIGTERM (it logs a "crash" and the process later aborts).
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:

        def start_failed() -> str | None:  # a SIGTERM while Serve starts stops the wait, too
            return "stopped by SIGTERM while starting" if stop.is_set() else (failed() if failed else None)

        url = deploy(bundle, host, port, config, state_dir=state_dir, failed=start_failed)
        version = json.loads((bundle / "bundle.json").read_text())["version"]
        print(f"serving bundle {version} at {url}  (OpenAPI: {url}/docs; Ctrl-C or SIGTERM stops)")
        print(f"try: {curl_line(url, example_body(bundle))}", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except ServeStartError:
        if not stop.is_set():
            raise
        print("stopped by SIGTERM while starting", flush=True)  # a requested stop, not a failure
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("shutting down Serve", flush=True)
        serve.shutdown()


def serve_once(bundle: str | Path, body: dict, state_dir: str | Path | None = None) -> tuple[str, dict]:
    """Deploys the app for `bundle` on a free port of the connected Ray, answers `body` over HTTP, shuts Serve
    down (the demo). Returns (the app's URL, the answer)."""
    import socket

    _require_ray()
    with socket.socket() as s:  # a free port: the demo must not collide with a running `crossrec serve`
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        url = deploy(bundle, port=port, state_dir=state_dir)
        req = urllib.request.Request(
            f"{url}/v1/recommend", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return url, json.loads(r.read())
    finally:
        serve.shutdown()
