"""The bundle pipeline: `prepare_inputs` (catalog vectors by Ray Data, side blocks, the text prior) -> fit (Ray
Train) -> `finish_bundle` (priors, test evaluation, export, second-stage ranker by Ray Train). `crossrec train` runs
it all; `crossrec tune` runs `prepare_inputs` once, a fit per trial, and `finish_bundle` for the best trial. It
imports the stages; no stage imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray.train  # ray
import torch
from safetensors.torch import load_file

from crossrec.config import RunSettings, TrainConfig, config_to_dict
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.fingerprint import check_run, clear_run, fingerprint, has_run, read_fingerprint, write_fingerprint
from crossrec.model import CrossRecModel
from crossrec.splits import Splits, splits_for
from trainers.runtime import best_checkpoint, check_end_to_end_memory, init_ray, storage_uri
from trainers.train import fit, make_item_input, model_domains, resolved_init, resolved_prior

__all__ = ["Inputs", "TrainedRun", "prepare_inputs", "train_bundle", "finish_bundle", "claim_run"]


@dataclass
class Inputs:
    """What a run trains from, computed once before any training (a sweep shares them between its trials)."""

    vectors: str | None  # catalog vectors .npy ([text | graph | features]), None for an id model
    side_dims: list[int] | None  # sizes of the graph / feature blocks after the text columns
    config: TrainConfig  # with side_dims set and, when asked, the text prior chosen on validation


@dataclass
class TrainedRun:
    """What a fit left: its best checkpoint and how it got there."""

    checkpoint: ray.train.Checkpoint
    valid_metrics: dict  # the best checkpoint's reported metrics
    history: list[dict]  # per epoch
    time_s: dict = field(default_factory=dict)  # wall time per stage
    extra: dict = field(default_factory=dict)  # more bundle.json entries (the run, the sweep trial)


def prepare_inputs(
    dataset: Dataset,
    splits: Splits,
    cfg: TrainConfig,
    progress: bool = True,
    address: str | None = None,
    embed: bool | None = None,
    resolve_prior: bool = True,
) -> Inputs:
    """Catalog vectors (Ray Data, cached on disk) for text items (or when `embed`), the graph / feature blocks
    fused beside them, and the text prior's weights chosen on validation (`resolve_prior`). `crossrec train` and
    `crossrec tune` both start here."""
    cfg = replace(cfg)
    vec_path = None
    if embed is None:
        embed = cfg.item_encoder == "text"
    if embed:
        from trainers.embed import embed_catalog

        vec_path = str(embed_catalog(dataset, splits, cfg, progress=progress, address=address))
    if cfg.graph.enabled or cfg.feature_columns:  # [text | graph | features], fused in the item encoder
        from crossrec.fusion import with_side_vectors

        path, cfg.side_dims = with_side_vectors(dataset, splits, cfg, vec_path)
        vec_path = str(path)
    if resolve_prior:
        cfg = resolved_prior(cfg, dataset, vec_path, splits)
        if cfg.text_prior and cfg.item_encoder == "text" and progress:
            print(f"text prior: decay {cfg.text_prior_decay}, other domains' weight {cfg.text_prior_cross}")
    return Inputs(vec_path, cfg.side_dims, cfg)


def train_bundle(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    run: RunSettings,
    resume_from: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """`crossrec train`: inputs, Ray Train fit, then `finish_bundle`. Returns bundle.json. A run name that already
    holds a run continues it only with the same fingerprint (`claim_run`)."""

    cfg = resolved_init(cfg)  # before any work, and recorded absolute in the bundle
    dataset = Dataset.load(data)
    splits = splits_for(dataset, cfg, training=True)  # held-out domains never reach training
    model_domains(cfg, splits)  # unknown train_domains fail before any Ray work
    check_end_to_end_memory(cfg, run.workers, run.address, progress)  # refuses before Ray starts
    out = Path(out)
    run.storage_path = run.storage_path or str(out.parent / ".runs")
    run.name = run.name or out.name
    claim_run(dataset.content_hash, cfg, run, resume, force)  # before any Ray work too
    t0 = time.time()
    inputs = prepare_inputs(dataset, splits, cfg, progress, run.address)
    t_embed = time.time() - t0
    _, _, result = fit(data, inputs.config, run, inputs.vectors, resume_from, progress)
    best, valid_metrics, history = best_checkpoint(result)
    trained = TrainedRun(
        best,
        valid_metrics,
        history,
        {"embed": round(t_embed, 1), "fit": round(time.time() - t0 - t_embed, 1)},
        {"run": {"workers": run.workers, "name": run.name}},
    )
    return finish_bundle(data, out, inputs, trained, run, progress, dataset, splits)


def claim_run(data_hash: str, cfg: TrainConfig, run: RunSettings, resume: bool = False, force: bool = False) -> str:
    """Checks the run folder (storage/name) against this run's fingerprint (data hash + config) and records it
    there: a different run exits 2 naming what differs, unless `force` (the old run is deleted: start over).
    Returns check_run's decision ("new", "continue", "restart")."""
    storage = storage_uri(run.storage_path, "out/.runs")
    folder = f"{storage.rstrip('/')}/{run.name}"
    fp = fingerprint(data_hash, config_to_dict(cfg))
    action = check_run(read_fingerprint(folder), fp, f"run {run.name!r} ({folder})", resume, force, has_run(folder))
    if action == "restart":
        clear_run(folder)
    write_fingerprint(folder, fp)
    return action


def finish_bundle(
    data: str | Path,
    out: str | Path,
    inputs: Inputs,
    trained: TrainedRun,
    run: RunSettings,
    progress: bool = True,
    dataset: Dataset | None = None,
    splits: Splits | None = None,
) -> dict:
    """A trained checkpoint -> its bundle at `out`: the model and the catalog's item vectors, the priors fitted on
    training rows and weighted on validation, test metrics, the bundle written, then the second-stage ranker
    when the config enables it (trained on the exported retriever with `run`'s workers). The one path of
    `crossrec train` and of a sweep's best trial. Returns bundle.json."""
    from crossrec.bundle import BundleContents, load_bundle, save_bundle
    from crossrec.priors import make_prior
    from crossrec.priors.base import choose
    from crossrec.progress import interactive
    from crossrec.retrieval import Retriever

    dataset = dataset or Dataset.load(data)
    cfg = inputs.config
    splits = splits or splits_for(dataset, cfg, training=True)
    cfg = resolved_prior(cfg, dataset, inputs.vectors, splits)  # as the run's fit() did (a tune trial's config)
    domains = model_domains(cfg, splits)
    work = Path(tempfile.mkdtemp(prefix="crossrec-export-"))  # end-to-end: adapter and merged backbone
    model, item_vecs, in_dim, adapter_dir = _trained_model(
        cfg, domains, inputs, trained, dataset, splits, work, progress
    )
    # The priors in their configured order, each weighted on validation targets (0 on the grid) over the model
    # plus the priors before it, before the test evaluation.
    retriever = Retriever(model, splits, item_vecs, domains, [make_prior(n, splits) for n in cfg.priors])
    for prior in retriever.priors:
        prior.fit(splits)
        choices = choose(retriever, prior, max_targets=cfg.valid_max_targets)
        if progress:
            print(f"{prior.label}: " + ", ".join(prior.describe(d) for d in choices))
    test = evaluate(splits, retriever, split="test", progress=progress and interactive(), desc="test")
    # ANN indexes for the large domains (retrieval.index), over the rows the bundle stores: what Serve searches.
    big = [d for d in splits.domains if cfg.retrieval.builds_index(splits.n_items[d])]
    t_index = time.time()
    retriever.ann_candidates = cfg.retrieval.candidates
    recall = retriever.build_indexes(cfg.retrieval.nprobe, big, tune_on=256)
    if big and progress:
        print(
            "ANN index: "
            + ", ".join(
                f"{d} nprobe {retriever.index[d].nprobe} (recall {recall.get(d, float('nan')):.3f})" for d in big
            )
            + f" in {time.time() - t_index:.1f} s"
        )
    metrics = {
        "valid": {k: v for k, v in trained.valid_metrics.items() if k.startswith("valid/")},
        "test": test.metrics,
        "n_targets": test.n_targets,
        "history": trained.history,
        "time_s": trained.time_s,
    }
    save_bundle(
        out,
        BundleContents(
            model=model,
            config=cfg,
            domains=domains,
            items=_bundle_items(dataset, splits, item_vecs),
            metrics=metrics,
            data_hash=dataset.content_hash,
            in_dim=in_dim,
            n_items=len(splits.item_ids) if cfg.item_encoder == "id" or cfg.item_ids else None,
            priors=retriever.priors,
            adapter_dir=adapter_dir,
            indexes=retriever.index,
            extra={
                "dataset": str(data),
                "backbone": cfg.backbone if cfg.item_encoder == "text" else None,
                "checkpoint": trained.checkpoint.path,
                "libraries": _libraries(),
                **trained.extra,
            },
        ),
    )
    shutil.rmtree(work, ignore_errors=True)
    if trained.history:  # loss and validation NDCG@10 per epoch, beside the weights they chose
        from crossrec.plots import plot_curves

        plot_curves(trained.history, Path(out) / "curves.png", f"{Path(out).name}: {cfg.mode}, backbone {cfg.backbone}")
    meta = load_bundle(out).meta
    if cfg.ranker.enabled:  # second stage, trained on the exported retriever (trainers/ranker.py)
        from trainers.ranker import train_ranker

        meta["ranker"] = train_ranker(out, data, run, cfg.ranker, progress)
    return meta


def _trained_model(
    cfg: TrainConfig,
    domains: list[str],
    inputs: Inputs,
    trained: TrainedRun,
    dataset: Dataset,
    splits: Splits,
    work: Path,
    progress: bool,
) -> tuple[CrossRecModel, torch.Tensor, int | None, Path | None]:
    """The checkpoint's model (ids for the model `domains`) in eval mode, the catalog's item vectors (N, V) under
    it, the backbone vectors' size and, end-to-end, the adapter folder (the catalog then re-embedded by the adapted
    backbone)."""
    adapter_dir = None
    n_items = len(splits.item_ids)
    with trained.checkpoint.as_directory() as folder:
        vectors = np.load(inputs.vectors) if inputs.vectors else None
        model = CrossRecModel(cfg, len(domains), in_dim=None if vectors is None else vectors.shape[1], n_items=n_items)
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        if cfg.mode == "end-to-end":
            adapter_dir, vectors = _export_backbone(cfg, folder, dataset, splits, work, progress)
    model.eval()
    with torch.inference_mode():
        item_input = make_item_input(cfg, splits, None if vectors is None else torch.from_numpy(vectors))
        item_vecs = torch.cat(
            [model.item_vectors(item_input(torch.arange(s, min(s + 8192, n_items)))) for s in range(0, n_items, 8192)]
        )
    return model, item_vecs, None if vectors is None else vectors.shape[1], adapter_dir


def _bundle_items(dataset: Dataset, splits: Splits, item_vecs: torch.Tensor) -> dict:
    """BundleContents.items: per domain (ids, titles, vectors) in the catalog's order."""
    titles = dataset.items.take(splits.item_row).column("title").to_pylist()
    items = {}
    for d in splits.domains:
        off, n = splits.offset[d], splits.n_items[d]
        items[d] = (splits.item_ids[off : off + n].tolist(), titles[off : off + n], item_vecs[off : off + n].numpy())
    return items


def _libraries() -> dict[str, str]:
    """Versions of the libraries a bundle's weights depend on (`crossrec inspect` shows them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("crossrec", "torch", "transformers", "peft", "ray", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _export_backbone(
    cfg: TrainConfig, folder: str, dataset: Dataset, splits: Splits, work: Path, progress: bool
) -> tuple[Path, np.ndarray]:
    """End-to-end checkpoint -> (peft adapter folder, the catalog's vectors from the adapted backbone). The
    vectors come from the Ray Data embedding job reading a merged copy of the backbone, so a bundle's item
    vectors match the backbone it serves with. On a multi-node cluster `work` must be on shared storage."""
    from crossrec.backbones import load_backbone
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import apply_lora, load_backbone_state, save_adapter, write_merged
    from trainers.embed import embed_texts_ray

    per_domain = cfg.lora.enabled and cfg.lora.per_domain
    backbone = apply_lora(load_backbone(cfg.backbone), cfg.lora, splits.domains if per_domain else ())
    load_backbone_state(backbone, load_file(os.path.join(folder, "backbone.safetensors")))
    adapter = save_adapter(backbone, work / "adapter")
    texts = catalog_texts(dataset.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
    init_ray()
    if per_domain:  # each domain's items through its own adapter
        vectors = None
        for d in splits.domains:
            merged = write_merged(backbone, work / f"merged-{d}", domain=d)
            off, n = splits.offset[d], splits.n_items[d]
            part = embed_texts_ray(texts[off : off + n], str(merged), cfg.max_tokens, progress=progress)
            vectors = part if vectors is None else np.concatenate([vectors, part])
        return adapter, vectors
    merged = write_merged(backbone, work / "merged")
    del backbone
    return adapter, embed_texts_ray(texts, str(merged), cfg.max_tokens, progress=progress)
