"""Catalog embedding as a Ray Data job: item texts -> frozen-backbone vectors, one actor per CPU (or GPU).

Each actor loads the backbone once and encodes batches of texts; rows carry their global item index (`gidx`),
so the result is put back in `Splits`' global item order whatever order the actors finish in. The vectors go
to the same on-disk cache as the in-process path (`crossrec.inference.backbone_vectors`), under the same key,
so whichever ran first serves the other and a cache hit starts no Ray work at all.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray  # ray
import ray.data  # ray

from crossrec.backbones import BackboneSpec, prepare_backbone
from crossrec.config import TrainConfig
from crossrec.dataset import Dataset
from crossrec.embedding import (
    cached_text_vectors,
    catalog_texts,
    load_cached_vectors,
    save_cached_vectors,
    template_of,
    vector_cache_path,
)
from crossrec.splits import Splits
from trainers.runtime import init_ray

__all__ = ["embed_catalog", "embed_texts_ray", "BackboneEncoder"]


class BackboneEncoder:
    """Ray Data callable class: the backbone is loaded once per actor, then every batch is
    {"gidx": (b,), "text": (b,)} -> {"gidx": (b,), "vector": (b, D) float32}."""

    def __init__(self, spec: BackboneSpec, max_tokens: int, threads: int, use_gpu: bool) -> None:
        import torch
        import transformers

        from crossrec.backbones import load_backbone

        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise
        # Ray workers start with OMP_NUM_THREADS=1: give torch the actor's whole CPU share.
        torch.set_num_threads(max(1, threads))
        self.backbone = load_backbone(spec)
        if use_gpu:
            self.backbone.to("cuda")
        self.max_tokens = max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        vectors = self.backbone.encode(texts, batch_size=max(1, len(texts)), max_length=self.max_tokens)  # (b, D)
        return {"gidx": np.asarray(batch["gidx"], dtype=np.int64), "vector": vectors}


def _actor_plan(actors: int | None, cpus_per_actor: float | None) -> tuple[int, float, int]:
    """(actors, CPUs per actor, GPUs per actor), sized to what the cluster has free now. A pool larger than the
    cluster is refused: on a 2-CPU machine, actors waiting for a third CPU would never start."""
    free, total = ray.available_resources(), ray.cluster_resources()  # ray
    gpus, cpus = int(free.get("GPU", 0)), float(free.get("CPU", 0))
    if gpus >= 1:
        n = actors or gpus
        if n > total.get("GPU", 0):
            raise ValueError(f"`actors` = {n} needs {n} GPUs (one each), the cluster has {total.get('GPU', 0):g}")
        # Tokenization runs on the CPU: share the free CPUs between the GPU actors.
        return n, float(cpus // n) if cpus >= n else 0.0, 1
    per = cpus_per_actor or 1.0
    n = actors or max(1, int(cpus // per))  # none free (a busy cluster): one actor, started when a CPU frees up
    if n * per > total.get("CPU", 0):
        raise ValueError(
            f"{n} actors x {per:g} CPUs need {n * per:g} CPUs, the cluster has "
            f"{total.get('CPU', 0):g}: lower `actors` or `cpus_per_actor`"
        )
    return n, per, 0


@contextmanager
def _ray_data_progress(show: bool) -> Iterator[None]:
    """Ray Data's own progress bars (logged progress when stdout is not a terminal) on or off for one run;
    off also silences its start/finish log lines. The driver's DataContext and logger are restored after."""
    ctx = ray.data.DataContext.get_current()  # ray
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = show
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    if not show:
        data_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved
        data_log.setLevel(level)


def embed_texts_ray(
    texts: list[str],
    backbone: str | BackboneSpec,
    max_tokens: int,
    batch_size: int = 128,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Texts -> (N, D) float32 vectors in input order, computed by a Ray Data actor pool (Ray must be up).

    actors: pool size (default: one per free GPU, else one per `cpus_per_actor` free CPUs, default 1 CPU each);
    each actor runs torch on as many threads as CPUs it holds.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if actors is not None and actors < 1:
        raise ValueError(f"`actors` must be >= 1, got {actors}")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise ValueError(f"`cpus_per_actor` must be > 0, got {cpus_per_actor}")
    spec = prepare_backbone(backbone)  # converts a GGUF backbone once, here, not in every actor
    n = len(texts)
    if n == 0:
        return np.zeros((0, spec.dim), dtype=np.float32)
    n_actors, cpus, gpus = _actor_plan(actors, cpus_per_actor)
    # Longest texts first, as Backbone.encode does: batches of similar length waste little on padding.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    table = pa.table({"gidx": pa.array(order, pa.int64()), "text": pa.array([texts[i] for i in order], pa.string())})
    # Several blocks per actor, so the pool shares the work (one block would go to one actor).
    rows_per_block = max(batch_size, min(batch_size * 8, math.ceil(n / (4 * n_actors))))
    blocks = [table.slice(s, rows_per_block) for s in range(0, n, rows_per_block)]

    from crossrec.progress import Progress, verbose

    # Ray Data's own bars and INFO lines only with --verbose: ours is one bar (or one line) for the whole job.
    bar = Progress(n, f"embed catalog ({spec.name})", "item", progress)
    with _ray_data_progress(progress and verbose()), warnings.catch_warnings(), bar:
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ray.data.from_arrow(blocks).map_batches(  # ray
            BackboneEncoder,
            fn_constructor_kwargs={
                "spec": spec,
                "max_tokens": max_tokens,
                "threads": max(1, int(cpus)),
                "use_gpu": gpus > 0,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),  # ray
            num_cpus=cpus,
            num_gpus=gpus or None,
            udf_modifying_row_count=False,
            # One node: an actor that dies (out of memory) dies again on restart, and restartable actors make the
            # core worker print an error line about constructor arguments in the object store to every user.
            # Several nodes: restarts survive a lost node. (Ray 2.60 takes it only as a bare remote arg, and warns
            # that these go in 2.64: the pin is 2.60.)
            **({"max_restarts": 0} if len(ray.nodes()) == 1 else {}),
        )
        out = np.empty((n, spec.dim), dtype=np.float32)
        done = np.zeros(n, dtype=bool)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # ray
            out[batch["gidx"]] = batch["vector"]
            done[batch["gidx"]] = True
            bar.update(len(batch["gidx"]))
    if not done.all():
        raise RuntimeError(f"Ray Data embedding returned vectors for {int(done.sum())} of {n} texts")
    return out


def embed_catalog(
    dataset: Dataset, splits: Splits, cfg: TrainConfig, progress: bool = True, address: str | None = None
) -> Path:
    """The .npy of frozen-backbone vectors of `dataset`'s catalog in `splits`' global item order: from the cache
    when present, else computed on Ray (joined at `address`, else the running or a new local Ray; see
    `trainers.runtime.init_ray`) and cached."""
    template = template_of(cfg.text_template, cfg.max_tokens)
    # The texts are rendered here, on the driver: the cache key is a hash of them.
    texts = catalog_texts(dataset.items.take(splits.item_row), template)
    path = vector_cache_path(splits.item_ids.tolist(), texts, cfg.backbone, template)
    if load_cached_vectors(path, len(texts)) is not None:
        return path

    def embed(new: list[str]) -> np.ndarray:  # only texts the per-text store lacks reach Ray
        init_ray(address)
        return embed_texts_ray(new, cfg.backbone, cfg.max_tokens, progress=progress)

    vectors, _ = cached_text_vectors(texts, cfg.backbone, cfg.max_tokens, embed, progress)
    save_cached_vectors(path, vectors)
    return path
