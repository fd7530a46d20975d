"""The bundle pipeline of `crossrec train`: catalog vectors (Ray Data) -> fit (Ray Train) -> test evaluation and
export -> second-stage ranker (Ray Train). It imports the stages; no stage imports it.

`export_bundle` also turns the best trial of a sweep into a bundle (`trainers.tune`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train  # ray
import torch
from safetensors.torch import load_file

from crossrec.config import RunSettings, TrainConfig, config_to_dict
from crossrec.dataset import Dataset
from crossrec.domains import domain_ids
from crossrec.evaluation import evaluate
from crossrec.fingerprint import check_run, clear_run, fingerprint, has_run, read_fingerprint, write_fingerprint
from crossrec.model import CrossRecModel
from crossrec.splits import Splits, splits_for
from crossrec.training import ModelScorer
from trainers.runtime import best_checkpoint, check_end_to_end_memory, init_ray, storage_uri
from trainers.train import fit, make_item_input, model_domains, resolved_init, resolved_prior

__all__ = ["train_bundle", "export_bundle", "claim_run"]


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
    """`crossrec train`: vectors (cached mode), Ray Train fit, test evaluation, bundle export. Returns bundle.json.
    A run name that already holds a run continues it only with the same fingerprint (`claim_run`)."""

    cfg = resolved_init(cfg)  # before any work, and recorded absolute in the bundle
    dataset = Dataset.load(data)
    splits = splits_for(dataset, cfg, training=True)  # held-out domains never reach training
    model_domains(cfg, splits)  # unknown train_domains fail before any Ray work
    check_end_to_end_memory(cfg, run.workers, run.address, progress)  # refuses before Ray starts
    out = Path(out)
    run.storage_path = run.storage_path or str(out.parent / ".runs")
    run.name = run.name or out.name
    claim_run(dataset.content_hash, cfg, run, resume, force)  # before any Ray work too
    vec_path = None
    t0 = time.time()
    if cfg.item_encoder == "text":
        from trainers.embed import embed_catalog

        vec_path = embed_catalog(dataset, splits, cfg, progress=progress, address=run.address)
        cfg = resolved_prior(cfg, dataset, vec_path, splits)
        if cfg.text_prior and progress:
            print(f"text prior: decay {cfg.text_prior_decay}, other domains' weight {cfg.text_prior_cross}")
        if cfg.graph.enabled or cfg.feature_columns:  # [text | graph | features], fused in the item encoder
            from crossrec.fusion import with_side_vectors

            vec_path, cfg.side_dims = with_side_vectors(dataset, splits, cfg, vec_path)
    t_embed = time.time() - t0
    _, _, result = fit(data, cfg, run, vec_path, resume_from, progress)
    best, valid_metrics, history = best_checkpoint(result)
    t_fit = time.time() - t0 - t_embed
    meta = export_bundle(
        data,
        out,
        cfg,
        best,
        valid_metrics,
        history,
        vec_path,
        {"embed": round(t_embed, 1), "fit": round(t_fit, 1)},
        {"run": {"workers": run.workers, "name": run.name}},
        progress,
        dataset,
        splits,
    )
    if cfg.ranker.enabled:  # second stage, trained on the exported retriever (trainers/ranker.py)
        from trainers.ranker import train_ranker

        meta["ranker"] = train_ranker(out, data, run, cfg.ranker, progress)
    return meta


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


def export_bundle(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    best: ray.train.Checkpoint,
    valid_metrics: dict,
    history: list[dict],
    vec_path: str | Path | None,
    time_s: dict,
    extra: dict | None = None,
    progress: bool = True,
    dataset: Dataset | None = None,
    splits: Splits | None = None,
) -> dict:
    """A checkpoint of `train_func` -> test evaluation -> bundle at `out` (used by `crossrec train` and, for the
    best trial, `crossrec tune`). Returns bundle.json."""
    from crossrec.bundle import load_bundle, save_bundle

    dataset = dataset or Dataset.load(data)
    splits = splits or splits_for(dataset, cfg, training=True)
    cfg = resolved_prior(cfg, dataset, vec_path, splits)  # as the run's fit() did (a tune trial's config)
    domains = model_domains(cfg, splits)
    dmap = domain_ids(domains, splits.domains)
    work = Path(tempfile.mkdtemp(prefix="crossrec-export-"))  # end-to-end: adapter and merged backbone
    adapter_dir = None
    with best.as_directory() as folder:
        vectors = np.load(vec_path) if vec_path else None
        n_items = len(splits.item_ids)
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
    from crossrec.progress import interactive

    scorer = ModelScorer(model, item_vecs, splits, dmap)
    pop_meta = None
    if cfg.pop_prior:  # gamma per domain on validation targets (0 on the grid), before the test evaluation
        from crossrec.pop_prior import fit_pop_prior, pop_prior_meta

        choices = fit_pop_prior(scorer, max_targets=cfg.valid_max_targets)
        pop_meta = pop_prior_meta(choices)
        if progress:
            print(
                "popularity prior: "
                + ", ".join(
                    f"{d} gamma {ch.weight:.4g} ({ch.relative:g} x spread, {ch.window}; valid NDCG@10 "
                    f"{ch.base_ndcg10:.4f} -> {ch.valid_ndcg10:.4f})"
                    for d, ch in choices.items()
                )
            )
    co_meta, co_pairs = None, None
    if cfg.co_prior:  # beta per domain on validation targets (0 on the grid), after the popularity prior
        from crossrec.co_prior import co_prior_meta, fit_co_prior
        from crossrec.transitions import Transitions

        transitions = Transitions.from_splits(splits)
        co_choices = fit_co_prior(scorer, transitions, max_targets=cfg.valid_max_targets)
        co_meta = co_prior_meta(co_choices, len(transitions))
        if any(ch.weight for ch in co_choices.values()):
            co_pairs = transitions.to_table(splits.item_ids, [splits.domains[k] for k in splits.item_domain])
        if progress:
            print(
                "transition prior: "
                + ", ".join(
                    f"{d} beta {ch.weight:.4g} ({ch.relative:g} x spread, decay {ch.decay:g}; valid NDCG@10 "
                    f"{ch.base_ndcg10:.4f} -> {ch.valid_ndcg10:.4f})"
                    for d, ch in co_choices.items()
                )
            )
    test = evaluate(splits, scorer, split="test", progress=progress and interactive(), desc="test")
    titles = dataset.items.take(splits.item_row).column("title").to_pylist()
    items = {}
    for d in splits.domains:
        off, n = splits.offset[d], splits.n_items[d]
        items[d] = (splits.item_ids[off : off + n].tolist(), titles[off : off + n], item_vecs[off : off + n].numpy())
    metrics = {
        "valid": {k: v for k, v in valid_metrics.items() if k.startswith("valid/")},
        "test": test.metrics,
        "n_targets": test.n_targets,
        "history": history,
        "time_s": time_s,
    }
    save_bundle(
        out,
        model,
        cfg,
        domains,
        None if vectors is None else vectors.shape[1],
        n_items if cfg.item_encoder == "id" or cfg.item_ids else None,
        items,
        metrics,
        dataset.content_hash,
        extra={
            "dataset": str(data),
            "backbone": cfg.backbone if cfg.item_encoder == "text" else None,
            "checkpoint": best.path,
            "libraries": _libraries(),
            **({"pop_prior": pop_meta} if pop_meta is not None else {}),
            **({"co_prior": co_meta} if co_meta is not None else {}),
            **(extra or {}),
        },
        adapter_dir=adapter_dir,
        pop=None
        if scorer.pop is None
        else {d: scorer.pop[splits.offset[d] : splits.offset[d] + splits.n_items[d]].numpy() for d in splits.domains},
        co=co_pairs,
    )
    shutil.rmtree(work, ignore_errors=True)
    if history:  # loss and validation NDCG@10 per epoch, beside the weights they chose
        from crossrec.plots import plot_curves

        plot_curves(history, Path(out) / "curves.png", f"{Path(out).name}: {cfg.mode}, backbone {cfg.backbone}")
    return load_bundle(out).meta


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
