"""Ray start-up, logging and the pieces every Ray Train driver and `train_func` share.

`init_ray` is the one place a crossrec process connects to Ray (commands, trainers, Serve's CLI path);
`setup_worker` is the first line of every `train_func`; `run_config` and `best_checkpoint` are the driver's
side of checkpointing (keep the best two by VALID_METRIC, read the run's history from the latest).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import ray  # ray
import ray.train  # ray
import torch

from crossrec.early_stopping import VALID_METRIC

__all__ = [
    "init_ray",
    "log_level",
    "setup_worker",
    "worker_nodes",
    "storage_uri",
    "run_config",
    "best_checkpoint",
    "check_end_to_end_memory",
]


def log_level(default: str = "WARNING") -> str:
    """Ray's own log level in crossrec processes (CROSSREC_RAY_LOG_LEVEL): our per-epoch lines carry progress."""
    return os.environ.get("CROSSREC_RAY_LOG_LEVEL", default)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects to a cluster, or starts the embedded local Ray (no dashboard, small object store)."""
    if ray.is_initialized():
        _drop_ray_noise()  # a Ray this process started otherwise (a test session's): the command's output still
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # inside a Ray job: the job's cluster
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray libraries in workers log at ERROR: without a dashboard Train's placement-group cleaner warns every
    # few seconds that the state API is unavailable; our own per-epoch lines carry the progress.
    quiet = ray.LoggingConfig(log_level=log_level("ERROR"))
    if address:
        ray.init(address=address, logging_level=log_level(), logging_config=quiet)
    else:
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=512 * 1024**2,
                logging_level=log_level(),
                log_to_driver=True,
                logging_config=quiet,
                runtime_env={"env_vars": {"RAY_ADDRESS": _own_gcs_address()}},
            )
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)  # this node's; not for a Ray a child process starts
    _drop_ray_noise()


# Lines Ray's processes print that a crossrec user can do nothing about, each harmless here. Dropped from the
# driver's output (the session's log files keep them; `crossrec --verbose` shows them):
_RAY_NOISE = re.compile(
    "|".join(
        [
            # Ray Train v2 creates its PreemptionWatcher actor with object-store arguments and restarts allowed, and
            # Ray's core worker logs that at ERROR (ray-project/ray#53727) on every fit.
            r"core_worker\.cc:\d+: Actor with class name: '\w+' and ID: '\w+' has constructor arguments in the "
            r"object store and max_restarts > 0",
            # serve.shutdown() kills the controller while its own graceful_shutdown call is being retried.
            r"Task ServeController\.graceful_shutdown failed\. There are infinite retries remaining",
        ]
    )
)


def _drop_ray_noise() -> None:
    """Leaves _RAY_NOISE out of what Ray prints in this (the driver's) process: worker and raylet output
    (`log_to_driver`) and the job's error messages from the GCS both go through `ray._private.worker.
    print_worker_logs`, looked up at each call; Ray has no public hook, so that function is wrapped (once)."""
    import ray._private.worker as ray_worker  # ray

    printer = ray_worker.print_worker_logs
    if getattr(printer, "crossrec_filtered", False) or os.environ.get("CROSSREC_VERBOSE") == "1":
        return

    def filtered(data: dict, *args, **kwargs) -> None:
        lines = [ln for ln in data.get("lines", []) if not _RAY_NOISE.search(ln)]
        if lines:
            printer({**data, "lines": lines}, *args, **kwargs)

    filtered.crossrec_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_worker_logs = filtered


def _own_gcs_address() -> str:
    """Chooses the GCS port of the local Ray this process is about to start (Ray reads RAY_GCS_SERVER_PORT) and
    returns its address. It goes into the job's runtime env, so every worker and actor of this process's Ray
    resolves it, whatever other Ray instances run on the machine: Ray Train's placement-group cleaner (a detached
    actor) otherwise looks for "the" local instance and fails with "Found multiple active Ray instances" when a
    second crossrec command (serve, demo, another train) has its own."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read when this process starts its node (removed after)
    return f"127.0.0.1:{port}"


def setup_worker(threads: int, seed: int) -> tuple[int, int]:
    """First lines of a `train_func`: quiet logs, torch threads, seed. Returns (world rank, world size)."""
    # Train V2 logs every report at INFO, partly on loggers outside `ray.train`; our epoch lines suffice.
    level = log_level()
    logging.getLogger().setLevel(level)
    logging.getLogger("ray.train").setLevel(level)
    ctx = ray.train.get_context()  # ray
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size()


def worker_nodes(world: int) -> list[dict[str, str]]:
    """Where each rank of the worker group runs, by rank: {"node_id", "ip"} of its Ray node, gathered over the
    process group (every rank must call it). A multi-node run's record of its placement."""
    import torch.distributed as dist

    here = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}  # ray
    if world == 1:
        return [here]
    nodes: list = [None] * world
    dist.all_gather_object(nodes, here)
    return nodes


def storage_uri(path: str | Path | None, default: str | Path) -> str:
    """Ray Train's `storage_path`: a URI (`s3://...`) as given, else an absolute filesystem path (workers and
    the driver may not share a working directory)."""
    if path is not None and "://" in str(path):
        return str(path)
    return str(Path(path or default).resolve())


def run_config(name: str, storage: str, max_failures: int = 0, callbacks: list | None = None):
    """The RunConfig of every crossrec fit: the best two checkpoints by VALID_METRIC (and the latest) kept."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig  # ray

    return RunConfig(
        name=name or f"crossrec-{int(time.time())}",
        storage_path=storage,
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=VALID_METRIC, checkpoint_score_order="max"
        ),
        failure_config=FailureConfig(max_failures=max_failures),
        callbacks=callbacks,
        logging_config=LoggingConfig(log_level=log_level()),
    )


def best_checkpoint(result, what: str = "training") -> tuple[ray.train.Checkpoint, dict, list[dict]]:
    """(best checkpoint by VALID_METRIC, its reported metrics, the whole run's history). The history is read
    from the latest checkpoint's state.json: the best one may be older than the last epoch."""
    best = result.get_best_checkpoint(VALID_METRIC, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"{what} reported no checkpoint")
    metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
    with (result.checkpoint or best).as_directory() as folder:
        history = json.loads(Path(folder, "state.json").read_text())["history"]
    return best, metrics, history


def _available_gb() -> float:
    """Memory this machine can still give (MemAvailable), less the 5% Ray's memory monitor keeps free."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20 - 0.05 * info["MemTotal"] / 2**20


def check_end_to_end_memory(cfg, workers: int, address: str | None, progress: bool = True) -> dict | None:
    """Before an end-to-end run starts on a local Ray: estimate each worker's peak (crossrec.finetune.
    memory_estimate) and refuse, naming the setting to lower, when `workers` of them cannot fit. On a cluster
    (an address) the nodes' memory is not this machine's: nothing is checked."""
    if cfg.mode != "end-to-end" or address or os.environ.get("RAY_ADDRESS") or not os.path.exists("/proc/meminfo"):
        return None
    from crossrec.backbones import prepare_backbone
    from crossrec.finetune import check_memory

    spec = prepare_backbone(cfg.backbone)
    est = check_memory(cfg, spec.path, workers, _available_gb())
    if progress:
        print(
            f"memory estimate: {workers} worker(s) x {est['total']:.1f} GiB (activations of "
            f"{est['grad_items']} items x {cfg.max_tokens} tokens: {est['activations']:.1f} GiB)",
            flush=True,
        )
    return est
