"""Training the two-tower model with Ray Train: `train_func(config)` runs on every worker; `fit` is the driver.

train_func is plain PyTorch from `crossrec.training` plus the few Ray lines it needs (context, report,
checkpoint I/O), marked `# ray`. DDP over gloo on CPUs, NCCL on GPUs (`ray.train.torch.prepare_model`).
Each epoch: train, validate (full ranking of a fixed subset of validation targets, split across workers,
summed with all_reduce), checkpoint (rank 0 writes, every rank reports), stop early after `patience`
epochs without gain. A re-run with the same run name, or a worker-group restart after a failure, resumes
from the latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray  # ray
import ray.train  # ray
import ray.train.torch  # ray
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from crossrec.bundle import init_from_bundle
from crossrec.config import RunSettings, TrainConfig, config_from_dict, config_to_dict
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.metrics import metrics_from_ranks
from crossrec.model import CrossRecModel
from crossrec.splits import Splits
from crossrec.training import ModelScorer, SequenceData, loss_inputs, resolve_text_prior, text_prior_unset
from trainers.strategies import DS_ENV, make_strategy

__all__ = ["train_func", "fit", "train_bundle", "export_bundle", "record_epoch", "resolved_prior", "VALID_METRIC",
           "CRASH_ENV"]

VALID_METRIC = "valid/ndcg@10"
# Fault injection for tests of FailureConfig: with CROSSREC_CRASH_AFTER_EPOCH=N every worker of a run that
# started without a checkpoint raises right after reporting epoch N; Ray Train restarts the worker group from
# that checkpoint (`RunSettings.max_failures`), and the restarted workers, which start from it, do not crash.
CRASH_ENV = "CROSSREC_CRASH_AFTER_EPOCH"


def model_domains(cfg: TrainConfig, splits: Splits) -> list[str]:
    """The domains the model learns ids for: the training domains (others are 'unknown' to it)."""
    domains = cfg.train_domains or splits.domains
    for d in domains:
        splits._check_domain(d)
    return sorted(domains)


def _embed_catalog(encoder, n_items: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """End-to-end validation: (N, D) backbone vectors of the whole catalog under the current weights, each
    rank embedding an equal share (padded, so every rank runs as many forwards: ZeRO-3 gathers collectively)."""
    per = -(-n_items // world)
    mine = torch.arange(rank * per, min((rank + 1) * per, n_items))
    padded = torch.cat([mine, torch.zeros(per - len(mine), dtype=torch.long)])
    x = encoder.embed(padded)  # (per, D)
    if world == 1:
        return x[:n_items]
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    dist.all_gather(parts, x.to(device))
    return torch.cat(parts).cpu()[:n_items]


def _eval_model(strategy, new_recommender, cfg: TrainConfig, splits: Splits, item_input, n_items: int,
                rank: int, world: int) -> tuple[CrossRecModel, torch.Tensor]:
    """A float32 CPU copy of the current recommender and its item vectors of the catalog (any strategy,
    any device; end-to-end re-embeds the catalog with the current backbone)."""
    from crossrec.finetune import EndToEndModel

    module = strategy.module
    with strategy.gathered():
        rec = new_recommender()
        rec.load_state_dict(strategy.weights()["model"])
        if isinstance(module, EndToEndModel):
            item_input = make_item_input(cfg, splits, _embed_catalog(module.encoder, n_items, rank, world,
                                                                     strategy.device))
    rec.eval()
    with torch.inference_mode():
        vecs = torch.cat([rec.item_vectors(item_input(torch.arange(s, min(s + 8192, n_items))))
                          for s in range(0, n_items, 8192)])
    return rec, vecs


def _validate(model: CrossRecModel, vecs: torch.Tensor, splits: Splits, domain_map: np.ndarray,
              cfg: TrainConfig, rank: int, world: int) -> dict[str, float]:
    """NDCG@10 / Recall@10 on the validation subset, per domain and overall, summed over workers."""
    scorer = ModelScorer(model, vecs, splits, domain_map)
    res = evaluate(splits, scorer, split="valid", max_targets=cfg.valid_max_targets, shard=(rank, world))
    sums = []
    for d in splits.domains:
        m = metrics_from_ranks(res.ranks[d], ks=(10,))
        n = res.n_targets[d]
        sums += [(m["ndcg@10"] or 0.0) * n, (m["recall@10"] or 0.0) * n, n]
    t = torch.tensor(sums, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    out, tot = {}, np.zeros(3)
    for k, d in enumerate(splits.domains):
        nd, rc, n = t[3 * k:3 * k + 3].tolist()
        tot += (nd, rc, n)
        out[f"valid/{d}/ndcg@10"] = nd / max(n, 1)
        out[f"valid/{d}/recall@10"] = rc / max(n, 1)
    out[VALID_METRIC] = tot[0] / max(tot[2], 1)
    out["valid/recall@10"] = tot[1] / max(tot[2], 1)
    return out


def make_item_input(cfg: TrainConfig, splits: Splits, vectors: torch.Tensor | None):
    """Global item indices -> the item encoder's input: the indices (id, and end-to-end text, whose model
    encodes the texts itself), the frozen backbone vectors (text), or (that, id rows) with `item_ids`, where
    items never seen in training get the "no id" row."""
    source = (lambda idx: idx) if vectors is None else (lambda idx: vectors[idx])
    if cfg.item_encoder == "id" or not cfg.item_ids:
        return source
    n = len(splits.item_ids)
    id_of = torch.where(torch.from_numpy(splits.train_count > 0), torch.arange(n), torch.tensor(n))
    return lambda idx: (source(idx), id_of[idx])


def train_func(config: dict) -> None:
    """One Ray Train worker. config: {"train": TrainConfig dict, "data": path, "vectors": .npy path or None
    (end-to-end: the frozen backbone's, to initialise the adaptor), "resume_from": checkpoint folder or None,
    "threads": torch threads, "env": environment for DeepSpeed (see strategies.DS_ENV) and CRASH_ENV}."""
    cfg = config_from_dict(config["train"])
    for key, value in (config.get("env") or {}).items():
        os.environ.setdefault(key, value)
    # Train V2 logs every report at INFO, partly on loggers outside `ray.train`; our epoch lines suffice.
    level = os.environ.get("CROSSREC_RAY_LOG_LEVEL", "WARNING")
    logging.getLogger().setLevel(level)
    logging.getLogger("ray.train").setLevel(level)
    ctx = ray.train.get_context()  # ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads", 1)))
    torch.manual_seed(cfg.seed)

    dataset = Dataset.load(config["data"])
    splits = Splits(dataset, cfg.min_per_domain)
    domains = model_domains(cfg, splits)
    dmap = np.array([domains.index(d) if d in domains else len(domains) for d in splits.domains])
    seqs = SequenceData(splits, cfg.max_len, cfg.train_domains, dmap)
    n_items = len(splits.item_ids)
    vectors = torch.from_numpy(np.load(config["vectors"])) if cfg.item_encoder == "text" else None
    end_to_end = cfg.mode == "end-to-end"
    item_input = make_item_input(cfg, splits, None if end_to_end else vectors)
    in_dim = None if vectors is None else vectors.shape[1]

    def new_recommender() -> CrossRecModel:
        return CrossRecModel(cfg, len(domains), in_dim=in_dim, n_items=n_items)

    model = new_recommender()
    if cfg.init_from:
        init_from_bundle(model, cfg, domains, cfg.init_from)
    elif cfg.item_encoder == "text":
        model.adaptor.init_from_vectors(vectors[:, :model.adaptor_in_dim])  # rank 0's init wins: DDP broadcasts it
    if cfg.finetune == "adaptor":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("adaptor."))
    if end_to_end:  # the backbone (LoRA or all weights) trains with the recommender, at backbone_lr
        from crossrec.embedding import catalog_texts, template_of
        from crossrec.finetune import build_end_to_end

        texts = catalog_texts(dataset.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
        model = build_end_to_end(cfg, model, texts, [splits.domains[k] for k in splits.item_domain])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("encoder.")]}]
    if end_to_end:
        groups.append({"params": [p for n, p in trainable if n.startswith("encoder.")], "lr": cfg.backbone_lr})
    strategy = make_strategy(cfg, rank, world, ray.train.torch.get_device())  # ray: the worker's device
    strategy.prepare(model, groups)  # DDP over gloo / NCCL, or a DeepSpeed engine
    state = {"epoch": 0, "step": 0, "best": -1.0, "bad_epochs": 0, "history": []}
    ckpt = ray.train.get_checkpoint()  # ray: a re-run of the same run name, or a restart after a failure
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            state = strategy.load(folder)
    elif config.get("resume_from"):
        state = strategy.load(config["resume_from"])
    if state["epoch"]:
        state.setdefault("resumed_after", []).append(state["epoch"])  # the run's record of its restarts
        if rank == 0:
            print(f"resuming after epoch {state['epoch']} (step {state['step']})", flush=True)
    crash_after = None if ckpt is not None else int(os.environ.get(CRASH_ENV) or 0)

    item_domain = torch.from_numpy(splits.item_domain)
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d])
                    for d in (cfg.train_domains or splits.domains)]
    per_worker = max(1, cfg.batch_size // world)
    while state["epoch"] < cfg.epochs and not (cfg.max_steps and state["step"] >= cfg.max_steps):
        epoch = state["epoch"]
        t0 = time.time()
        strategy.train()
        # Same permutation on every rank (disjoint shards); negatives differ per rank.
        order_rng = np.random.default_rng([cfg.seed, epoch])
        neg_rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
        # Dropout draws seeded per epoch and rank too: a resumed run continues exactly as an uninterrupted one.
        torch.manual_seed(int(np.random.default_rng([cfg.seed, epoch, rank, 2]).integers(1 << 62)))
        losses, tokens, t_train = [], 0, time.time()
        for batch in seqs.batches(per_worker, order_rng, rank, world):
            inputs = loss_inputs(batch, item_input, item_domain, domain_items, cfg.n_negatives, neg_rng,
                                 len(domains), cfg.domain_dropout)
            if end_to_end:  # backbone tokens this step encodes (throughput metric)
                idx = inputs["item_x"][0] if isinstance(inputs["item_x"], tuple) else inputs["item_x"]
                tokens += int(model.encoder.lengths[idx].sum())
            losses.append(strategy.step(strategy.to_device(inputs)))
            state["step"] += 1
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        t_valid = time.time()
        rec, vecs = _eval_model(strategy, new_recommender, cfg, splits, item_input, n_items, rank, world)
        metrics = _validate(rec, vecs, splits, dmap, cfg, rank, world)
        metrics.update({"epoch": epoch + 1, "step": state["step"], "train/loss": float(np.mean(losses or [0])),
                        "train/epoch_s": time.time() - t0, "time/valid_s": time.time() - t_valid,
                        "train/step_s": (t_valid - t_train) / max(1, len(losses)),
                        # rank 0's numbers, times the ranks: every rank encodes about as many tokens
                        "train/tokens_per_s": tokens * world / max(t_valid - t_train, 1e-9),
                        "worker/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "worker/peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2 ** 20
                                               if torch.cuda.is_available() else 0.0),
                        "tau": float(rec.tau.detach())})
        stop = record_epoch(state, metrics, cfg.patience)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}  step {state['step']}  loss {metrics['train/loss']:.4f}  "
                  f"{VALID_METRIC} {metrics[VALID_METRIC]:.4f}  ({metrics['train/epoch_s']:.0f}s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            strategy.save(tmp, state)  # DDP: rank 0 writes; DeepSpeed: every rank writes its shards
            written = rank == 0 or cfg.strategy == "deepspeed"
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if written else None  # ray
            ray.train.report(metrics, checkpoint=checkpoint)  # ray
        if crash_after and state["epoch"] == crash_after:
            raise RuntimeError(f"{CRASH_ENV}={crash_after}: injected worker failure after epoch {crash_after}")
        if stop:
            break


def record_epoch(state: dict, metrics: dict, patience: int) -> bool:
    """Per-epoch bookkeeping of every trainer's `state` (epoch, best VALID_METRIC, epochs without gain,
    history); True when `patience` epochs passed without gain (0: never)."""
    state["epoch"] += 1
    improved = metrics[VALID_METRIC] > state["best"]
    state["best"] = max(state["best"], metrics[VALID_METRIC])
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    state["history"].append(metrics)
    return bool(patience) and state["bad_epochs"] >= patience


# -- driver -------------------------------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects to a cluster, or starts the embedded local Ray (no dashboard, small object store)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # inside a Ray job: the job's cluster
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray libraries in workers log at ERROR: without a dashboard Train's placement-group cleaner warns every
    # few seconds that the state API is unavailable; our own per-epoch lines carry the progress.
    quiet = ray.LoggingConfig(log_level=os.environ.get("CROSSREC_RAY_LOG_LEVEL", "ERROR"))
    if address:
        ray.init(address=address, logging_level="WARNING", logging_config=quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 1024 ** 2,
                 logging_level="WARNING", log_to_driver=True, logging_config=quiet)


def resolved_prior(cfg: TrainConfig, data: str | Path | Dataset, vectors: str | Path | None,
                   splits: Splits | None = None) -> TrainConfig:
    """cfg with an unset text-prior decay / cross weight chosen on validation (resolve_text_prior), from the
    frozen backbone vectors in the .npy at `vectors` (its text columns: graph/feature blocks follow them)."""
    if vectors is None or not text_prior_unset(cfg):
        return cfg
    x = np.load(vectors)
    x = x[:, :x.shape[1] - sum(cfg.side_dims or [])]
    if splits is None:
        splits = Splits(data if isinstance(data, Dataset) else Dataset.load(data), cfg.min_per_domain)
    return resolve_text_prior(cfg, splits, x)


def resolved_init(cfg: TrainConfig) -> TrainConfig:
    """cfg with `init_from` made absolute (the workers read it, and their working directory is not the
    driver's); fails naming the field when it is not a bundle."""
    if not cfg.init_from:
        return cfg
    path = Path(cfg.init_from).expanduser().resolve()
    if not (path / "bundle.json").is_file():
        raise ValueError(f"`init_from`: {cfg.init_from} is not a crossrec bundle (no bundle.json)")
    return replace(cfg, init_from=str(path))


def fit(data: str | Path, cfg: TrainConfig, run: RunSettings, vectors: str | Path | None,
        resume_from: str | Path | None = None, progress: bool = True, callbacks: list | None = None):
    """Runs a TorchTrainer and returns (best checkpoint folder, its metrics, the Result).
    callbacks: Ray Train callbacks for the RunConfig (a Tune trial passes `TuneReportCallback`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # ray
    from ray.train.torch import TorchTrainer  # ray

    cfg = resolved_prior(resolved_init(cfg), data, vectors)
    init_ray(run.address)
    # Train's controller polls its workers every 2 s by default: each fit then idles seconds at start and end.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    storage = str(Path(run.storage_path or "out/.runs").resolve()) if "://" not in str(run.storage_path or "") \
        else run.storage_path
    cpus = run.cpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"train": config_to_dict(cfg), "data": str(Path(data).resolve()),
                           "vectors": str(vectors) if vectors else None,
                           "resume_from": str(resume_from) if resume_from else None,
                           "threads": max(1, int(cpus)),
                           "env": {k: os.environ[k] for k in (*DS_ENV, CRASH_ENV) if k in os.environ}},
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=run.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cpus,
                                                           **({"GPU": run.gpus_per_worker}
                                                              if run.gpus_per_worker else {})}),
        run_config=RunConfig(
            name=run.name or f"crossrec-{int(time.time())}", storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=VALID_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=run.max_failures), callbacks=callbacks,
            logging_config=LoggingConfig(log_level=os.environ.get("CROSSREC_RAY_LOG_LEVEL", "WARNING"))),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(VALID_METRIC, "max") or result.checkpoint
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
    return best, metrics, result


def train_bundle(data: str | Path, out: str | Path, cfg: TrainConfig, run: RunSettings,
                 resume_from: str | Path | None = None, progress: bool = True) -> dict:
    """`crossrec train`: vectors (cached mode), Ray Train fit, test evaluation, bundle export. Returns bundle.json."""

    cfg = resolved_init(cfg)  # before any work, and recorded absolute in the bundle
    dataset = Dataset.load(data)
    splits = Splits(dataset, cfg.min_per_domain)
    model_domains(cfg, splits)  # unknown train_domains fail before any Ray work
    out = Path(out)
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
    run.storage_path = run.storage_path or str(out.parent / ".runs")
    run.name = run.name or out.name
    best, valid_metrics, result = fit(data, cfg, run, vec_path, resume_from, progress)
    t_fit = time.time() - t0 - t_embed
    # The whole run's history is in the latest checkpoint (the best one may be older).
    with (result.checkpoint or best).as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as f:
            history = json.load(f)["history"]
    meta = export_bundle(data, out, cfg, best, valid_metrics, history, vec_path,
                         {"embed": round(t_embed, 1), "fit": round(t_fit, 1)},
                         {"run": {"workers": run.workers, "name": run.name}}, progress, dataset, splits)
    if cfg.ranker.enabled:  # second stage, trained on the exported retriever (trainers/ranker.py)
        from trainers.ranker import train_ranker

        meta["ranker"] = train_ranker(out, data, run, cfg.ranker, progress)
    return meta


def export_bundle(data: str | Path, out: str | Path, cfg: TrainConfig, best: "ray.train.Checkpoint",
                  valid_metrics: dict, history: list[dict], vec_path: str | Path | None, time_s: dict,
                  extra: dict | None = None, progress: bool = True, dataset: Dataset | None = None,
                  splits: Splits | None = None) -> dict:
    """A checkpoint of `train_func` -> test evaluation -> bundle at `out` (used by `crossrec train` and, for the
    best trial, `crossrec tune`). Returns bundle.json."""
    from crossrec.bundle import load_bundle, save_bundle

    dataset = dataset or Dataset.load(data)
    splits = splits or Splits(dataset, cfg.min_per_domain)
    cfg = resolved_prior(cfg, dataset, vec_path, splits)  # as the run's fit() did (a tune trial's config)
    domains = model_domains(cfg, splits)
    dmap = np.array([domains.index(d) if d in domains else len(domains) for d in splits.domains])
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
        item_vecs = torch.cat([model.item_vectors(item_input(torch.arange(s, min(s + 8192, n_items))))
                               for s in range(0, n_items, 8192)])
    test = evaluate(splits, ModelScorer(model, item_vecs, splits, dmap), split="test", progress=progress,
                    desc="test")
    titles = dataset.items.take(splits.item_row).column("title").to_pylist()
    items = {}
    for d in splits.domains:
        off, n = splits.offset[d], splits.n_items[d]
        items[d] = (splits.item_ids[off:off + n].tolist(), titles[off:off + n], item_vecs[off:off + n].numpy())
    metrics = {"valid": {k: v for k, v in valid_metrics.items() if k.startswith("valid/")},
               "test": test.metrics, "n_targets": test.n_targets, "history": history, "time_s": time_s}
    save_bundle(out, model, cfg, domains, None if vectors is None else vectors.shape[1],
                n_items if cfg.item_encoder == "id" or cfg.item_ids else None, items, metrics, dataset.content_hash,
                extra={"dataset": str(data), "backbone": cfg.backbone if cfg.item_encoder == "text" else None,
                       "checkpoint": best.path, **(extra or {})}, adapter_dir=adapter_dir)
    shutil.rmtree(work, ignore_errors=True)
    return load_bundle(out).meta


def _export_backbone(cfg: TrainConfig, folder: str, dataset: Dataset, splits: Splits, work: Path,
                     progress: bool) -> tuple[Path, np.ndarray]:
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
            part = embed_texts_ray(texts[off:off + n], str(merged), cfg.max_tokens, progress=progress)
            vectors = part if vectors is None else np.concatenate([vectors, part])
        return adapter, vectors
    merged = write_merged(backbone, work / "merged")
    del backbone
    return adapter, embed_texts_ray(texts, str(merged), cfg.max_tokens, progress=progress)
