"""Training the two-tower model with Ray Train: `train_func(config)` runs on every worker; `fit` is the driver.

The bundle pipeline around it (catalog vectors -> fit -> export -> ranker) is `trainers.pipeline`.

train_func is plain PyTorch from `crossrec.training` plus the few Ray lines it needs (context, report,
checkpoint I/O), marked `# ray`. DDP over gloo on CPUs, NCCL on GPUs (`ray.train.torch.prepare_model`).
Each epoch: train, validate (full ranking of a fixed subset of validation targets, split across workers,
summed with all_reduce), checkpoint (rank 0 writes, every rank reports), stop early after `patience`
epochs without gain. A re-run with the same run name, or a worker-group restart after a failure, resumes
from the latest checkpoint.
"""

from __future__ import annotations

import os
import resource
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

from crossrec.bundle import bundle_meta, check_init, init_from_bundle
from crossrec.config import RunSettings, TrainConfig, config_from_dict, config_to_dict
from crossrec.dataset import Dataset
from crossrec.domains import domain_ids
from crossrec.early_stopping import VALID_METRIC, new_state, record_epoch
from crossrec.evaluation import evaluate
from crossrec.metrics import metrics_from_ranks
from crossrec.model import CrossRecModel
from crossrec.retrieval import Retriever
from crossrec.splits import Splits, splits_for
from crossrec.training import SequenceData, loss_inputs, resolve_text_prior, text_prior_unset
from trainers.runtime import best_checkpoint, init_ray, run_config, setup_worker, storage_uri, worker_nodes
from trainers.strategies import DS_ENV, make_strategy

__all__ = [
    "train_func",
    "fit",
    "initial_model",
    "model_domains",
    "make_item_input",
    "resolved_prior",
    "resolved_init",
    "CRASH_ENV",
    "KILL_ENV",
    "PAUSE_ENV",
]

# Fault injection for tests of FailureConfig: with CROSSREC_CRASH_AFTER_EPOCH=N every worker of a run that
# started without a checkpoint raises right after reporting epoch N; Ray Train restarts the worker group from
# that checkpoint (`RunSettings.max_failures`), and the restarted workers, which start from it, do not crash.
CRASH_ENV = "CROSSREC_CRASH_AFTER_EPOCH"
# A real process death instead: with CROSSREC_KILL_WORKER_IN_EPOCH=N[:PID_FILE] the last rank of a run that started
# without a checkpoint SIGKILLs itself after the first step of epoch N (mid-epoch), writing its pid to PID_FILE first
# (an existing PID_FILE: no kill, so it happens once).
KILL_ENV = "CROSSREC_KILL_WORKER_IN_EPOCH"
# A known moment to act on a run from outside (the multi-node test kills a node there): with
# CROSSREC_PAUSE_AFTER_EPOCH=N:FILE every worker of a run that started without a checkpoint waits after reporting
# epoch N until FILE exists (at most 10 minutes).
PAUSE_ENV = "CROSSREC_PAUSE_AFTER_EPOCH"


def _kill_plan(resumed: bool, rank: int, world: int) -> tuple[int, str]:
    """(epoch in which this worker SIGKILLs itself, pid file) from KILL_ENV; (0, "") for no kill."""
    value = os.environ.get(KILL_ENV) or ""
    if resumed or not value or rank != world - 1:
        return 0, ""
    epoch, _, pid_file = value.partition(":")
    return (0, "") if pid_file and Path(pid_file).exists() else (int(epoch), pid_file)


def _pause_plan(resumed: bool) -> tuple[int, str]:
    """(epoch after whose report this worker waits, the file it waits for) from PAUSE_ENV; (0, "") for no pause."""
    value = os.environ.get(PAUSE_ENV) or ""
    if resumed or not value:
        return 0, ""
    epoch, _, release = value.partition(":")
    return int(epoch), release


def _pause(release: str, limit_s: float = 600.0) -> None:
    deadline = time.time() + limit_s
    while not Path(release).exists() and time.time() < deadline:
        time.sleep(0.5)


def _kill_self(pid_file: str) -> None:
    import signal

    # Train's controller collects reports when it polls the workers (every 0.5 s here): a worker that dies at once
    # after a report can take that report's checkpoint with it, and the restart then starts from the one before.
    time.sleep(3)
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def model_domains(cfg: TrainConfig, splits: Splits) -> list[str]:
    """The domains the model learns ids for: the training domains (others are 'unknown' to it)."""
    domains = cfg.train_domains or splits.domains
    for d in domains:
        splits.check_domain(d)
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


def _refill_bank(strategy, n_items: int, rank: int, world: int) -> None:
    """A resumed end-to-end run's bank of backbone vectors as the last validation left it (the bank is a rank's
    cache, not in the checkpoint): the restored backbone re-embeds the catalog, so the steps after a restart read
    the vectors an uninterrupted run reads."""
    from crossrec.finetune import EndToEndModel

    module = strategy.module
    if isinstance(module, EndToEndModel) and module.bank_steps:
        with strategy.gathered(), torch.no_grad():
            module.refresh_bank(_embed_catalog(module.encoder, n_items, rank, world, strategy.device))


def _eval_model(
    strategy, new_recommender, cfg: TrainConfig, splits: Splits, item_input, n_items: int, rank: int, world: int
) -> tuple[CrossRecModel, torch.Tensor]:
    """A float32 CPU copy of the current recommender and its item vectors of the catalog (any strategy,
    any device; end-to-end re-embeds the catalog with the current backbone: validation ranks every item of a
    target's domain, and the same vectors refill the model's bank of vectors without gradients)."""
    from crossrec.finetune import EndToEndModel

    module = strategy.module
    with strategy.gathered():
        rec = new_recommender()
        rec.load_state_dict(strategy.weights()["model"])
        if isinstance(module, EndToEndModel):
            catalog = _embed_catalog(module.encoder, n_items, rank, world, strategy.device)
            module.refresh_bank(catalog)  # the next steps' items without gradients read these
            item_input = make_item_input(cfg, splits, catalog)
    rec.eval()
    with torch.inference_mode():
        vecs = torch.cat(
            [rec.item_vectors(item_input(torch.arange(s, min(s + 8192, n_items)))) for s in range(0, n_items, 8192)]
        )
    return rec, vecs


def _validate(
    model: CrossRecModel,
    vecs: torch.Tensor,
    splits: Splits,
    domains: list[str],
    cfg: TrainConfig,
    rank: int,
    world: int,
) -> dict[str, float]:
    """NDCG@10 / Recall@10 on the validation subset, per domain and overall, summed over workers."""
    scorer = Retriever(model, splits, vecs, domains)  # the model alone: priors are chosen at training end
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
        nd, rc, n = t[3 * k : 3 * k + 3].tolist()
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


def initial_model(
    cfg: TrainConfig,
    dataset: Dataset,
    splits: Splits,
    domains: list[str],
    model: CrossRecModel,
    vectors: torch.Tensor | None,
    workers: int = 1,
) -> torch.nn.Module:
    """The module training starts from (step 0): `model` initialised from `init_from` (its recommender weights, and
    in end-to-end mode its LoRA adapter(s) or fine-tuned backbone) or from the catalog's vectors, with only the
    adaptor trainable under `finetune: adaptor`; end-to-end wraps it with the (adapted) backbone (`workers`: the
    Train workers sharing the machine, for its memory estimate)."""
    if cfg.init_from:
        init_from_bundle(model, cfg, domains, cfg.init_from, splits.item_ids)
    elif cfg.item_encoder == "text":
        model.adaptor.init_from_vectors(vectors[:, : model.adaptor_in_dim])  # rank 0's init wins: DDP broadcasts it
    if cfg.finetune == "adaptor":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("adaptor."))
    if cfg.mode == "end-to-end":  # the backbone (LoRA or all weights) trains with the recommender, at backbone_lr
        from crossrec.embedding import catalog_texts, template_of
        from crossrec.finetune import build_end_to_end, init_backbone_from_bundle

        texts = catalog_texts(dataset.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
        model = build_end_to_end(cfg, model, texts, [splits.domains[k] for k in splits.item_domain], workers=workers)
        if cfg.init_from:
            init_backbone_from_bundle(model.encoder.backbone, cfg, cfg.init_from)
    return model


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's groups: the recommender at `lr`, the backbone's trainable weights (end-to-end) at
    `backbone_lr`."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("encoder.")]}]
    if cfg.mode == "end-to-end":
        groups.append({"params": [p for n, p in trainable if n.startswith("encoder.")], "lr": cfg.backbone_lr})
    return groups


def _restored_state(strategy, ckpt, resume_from: str | None, rank: int) -> dict:
    """The run's state (and the strategy's weights) from Train's checkpoint (a re-run of the same run name, or a
    restart after a failure), else from `resume_from`, else a new state."""
    state = new_state()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            state = strategy.load(folder)
    elif resume_from:
        state = strategy.load(resume_from)
    if state["epoch"]:
        state.setdefault("resumed_after", []).append(state["epoch"])  # the run's record of its restarts
        if rank == 0:
            print(f"resuming after epoch {state['epoch']} (step {state['step']})", flush=True)
    return state


def _step_line(epoch: int, epochs: int, done: int, n_steps: int, per_step_s: float) -> None:
    """Workers' stdout reaches the driver as lines: a step count with its ETA now and then, not a bar."""
    print(
        f"epoch {epoch + 1}/{epochs}: step {done}/{n_steps} ({100 * done / max(1, n_steps):.0f}%), "
        f"{per_step_s:.1f}s/step, epoch ETA {per_step_s * (n_steps - done):.0f}s + validation",
        flush=True,
    )


def _epoch_stats(losses: list[float], tokens: int, world: int, t0: float, t_train: float, t_valid: float) -> dict:
    """Loss, times, throughput and memory of an epoch (rank 0's; tokens times the ranks: every rank encodes
    about as many)."""
    return {
        "train/loss": float(np.mean(losses or [0])),
        "train/epoch_s": time.time() - t0,
        "time/valid_s": time.time() - t_valid,
        "train/step_s": (t_valid - t_train) / max(1, len(losses)),
        "train/tokens_per_s": tokens * world / max(t_valid - t_train, 1e-9),
        "worker/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker/peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
    }


def train_func(config: dict) -> None:
    """One Ray Train worker. config: {"train": TrainConfig dict, "data": path, "vectors": .npy path or None
    (end-to-end: the frozen backbone's, to initialise the adaptor), "resume_from": checkpoint folder or None,
    "threads": torch threads, "env": environment for DeepSpeed (see strategies.DS_ENV) and CRASH_ENV}."""
    cfg = config_from_dict(config["train"])
    for key, value in (config.get("env") or {}).items():
        os.environ.setdefault(key, value)
    rank, world = setup_worker(config.get("threads", 1), cfg.seed)  # ray: rank and world from Train's context

    dataset = Dataset.load(config["data"])
    splits = splits_for(dataset, cfg, training=True)  # held-out domains never reach training
    domains = model_domains(cfg, splits)
    dmap = domain_ids(domains, splits.domains)
    seqs = SequenceData(splits, cfg.max_len, cfg.train_domains, dmap)
    n_items = len(splits.item_ids)
    vectors = torch.from_numpy(np.load(config["vectors"])) if cfg.item_encoder == "text" else None
    end_to_end = cfg.mode == "end-to-end"
    item_input = make_item_input(cfg, splits, None if end_to_end else vectors)
    in_dim = None if vectors is None else vectors.shape[1]

    def new_recommender() -> CrossRecModel:
        return CrossRecModel(cfg, len(domains), in_dim=in_dim, n_items=n_items)

    model = initial_model(cfg, dataset, splits, domains, new_recommender(), vectors, workers=world)
    strategy = make_strategy(cfg, rank, world, ray.train.torch.get_device())  # ray: the worker's device
    strategy.prepare(model, _param_groups(model, cfg))  # DDP over gloo / NCCL, or a DeepSpeed engine
    ckpt = ray.train.get_checkpoint()  # ray: a re-run of the same run name, or a restart after a failure
    state = _restored_state(strategy, ckpt, config.get("resume_from"), rank)
    if state["epoch"]:
        _refill_bank(strategy, n_items, rank, world)
    # The run's record of where each start of the worker group ran (rank -> node): a restart after a node is lost
    # lands elsewhere.
    state.setdefault("worker_nodes", []).append(worker_nodes(world))  # ray: each rank's node
    crash_after = None if ckpt is not None else int(os.environ.get(CRASH_ENV) or 0)
    progress_every = float(config.get("progress_every_s", 0))  # s between step lines (0: none)
    kill_in, kill_pid_file = _kill_plan(ckpt is not None, rank, world)
    pause_after, pause_release = _pause_plan(ckpt is not None)

    item_domain = torch.from_numpy(splits.item_domain)
    domain_items = [
        torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d])
        for d in (cfg.train_domains or splits.domains)
    ]
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
        per_rank = len(seqs) // world
        n_steps = per_rank // per_worker if per_rank >= per_worker else int(per_rank > 0)
        if cfg.max_steps:
            n_steps = min(n_steps, cfg.max_steps - state["step"])
        shown = time.time()
        for batch in seqs.batches(per_worker, order_rng, rank, world):
            inputs = loss_inputs(
                batch,
                item_input,
                item_domain,
                domain_items,
                cfg.n_negatives,
                neg_rng,
                len(domains),
                cfg.domain_dropout,
                cfg.ssl_mask if cfg.ssl_weight else None,
            )
            before = model.tokens if end_to_end else 0
            losses.append(strategy.step(strategy.to_device(inputs)))
            tokens += model.tokens - before if end_to_end else 0  # backbone tokens the step encoded (throughput)
            state["step"] += 1
            if rank == 0 and progress_every and time.time() - shown > progress_every and len(losses) < n_steps:
                shown = time.time()
                _step_line(epoch, cfg.epochs, len(losses), n_steps, (shown - t_train) / len(losses))
            if kill_in == epoch + 1:  # fault injection (KILL_ENV): a real process death, mid-epoch
                _kill_self(kill_pid_file)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        t_valid = time.time()
        rec, vecs = _eval_model(strategy, new_recommender, cfg, splits, item_input, n_items, rank, world)
        metrics = _validate(rec, vecs, splits, domains, cfg, rank, world)
        metrics.update(
            {
                "epoch": epoch + 1,
                "step": state["step"],
                "tau": float(rec.tau.detach()),
                **_epoch_stats(losses, tokens, world, t0, t_train, t_valid),
            }
        )
        stop = record_epoch(state, metrics, cfg.patience)
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}  step {state['step']}  loss {metrics['train/loss']:.4f}  "
                f"{VALID_METRIC} {metrics[VALID_METRIC]:.4f}  ({metrics['train/epoch_s']:.0f}s)",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            strategy.save(tmp, state)  # DDP: rank 0 writes; DeepSpeed: every rank writes its shards
            written = rank == 0 or cfg.strategy == "deepspeed"
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if written else None  # ray
            ray.train.report(metrics, checkpoint=checkpoint)  # ray
        if crash_after and state["epoch"] == crash_after:
            raise RuntimeError(f"{CRASH_ENV}={crash_after}: injected worker failure after epoch {crash_after}")
        if pause_after and state["epoch"] == pause_after:  # fault injection (PAUSE_ENV): wait to be acted on
            _pause(pause_release)
        if stop:
            break


# -- driver -------------------------------------------------------------------------------------------------
def resolved_prior(
    cfg: TrainConfig, data: str | Path | Dataset, vectors: str | Path | None, splits: Splits | None = None
) -> TrainConfig:
    """cfg with an unset text-prior decay / cross weight chosen on validation (resolve_text_prior), from the
    frozen backbone vectors in the .npy at `vectors` (its text columns: graph/feature blocks follow them)."""
    if vectors is None or not text_prior_unset(cfg):
        return cfg
    x = np.load(vectors)
    x = x[:, : x.shape[1] - sum(cfg.side_dims or [])]
    if splits is None:
        splits = splits_for(data if isinstance(data, Dataset) else Dataset.load(data), cfg, training=True)
    return resolve_text_prior(cfg, splits, x)


def resolved_init(cfg: TrainConfig) -> TrainConfig:
    """cfg with `init_from` made absolute (the workers read it, and their working directory is not the
    driver's); fails naming the field when it is not a bundle, or one of another model shape (before any Ray
    work: the workers would fail with a traceback)."""
    if not cfg.init_from:
        return cfg
    check_init(bundle_meta(Path(cfg.init_from).expanduser(), "`init_from`")["config"], cfg)  # names the path as given
    return replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))


def fit(
    data: str | Path,
    cfg: TrainConfig,
    run: RunSettings,
    vectors: str | Path | None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    callbacks: list | None = None,
):
    """Runs a TorchTrainer and returns (best checkpoint folder, its metrics, the Result).
    callbacks: Ray Train callbacks for the RunConfig (a Tune trial passes `TuneReportCallback`). progress: rank 0
    prints the step count with an ETA every 30 s of an epoch, besides its line per epoch."""
    from ray.train import ScalingConfig  # ray
    from ray.train.torch import TorchTrainer  # ray

    cfg = resolved_prior(resolved_init(cfg), data, vectors)
    init_ray(run.address)
    # Train's controller polls its workers every 2 s by default: each fit then idles seconds at start and end.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    cpus = run.cpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "train": config_to_dict(cfg),
            "data": str(Path(data).resolve()),
            "vectors": str(vectors) if vectors else None,
            "resume_from": str(resume_from) if resume_from else None,
            "threads": max(1, int(cpus)),
            "progress_every_s": 30.0 if progress else 0.0,
            "env": {k: os.environ[k] for k in (*DS_ENV, CRASH_ENV, KILL_ENV, PAUSE_ENV) if k in os.environ},
        },
        scaling_config=ScalingConfig(
            num_workers=run.workers,
            use_gpu=run.gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": run.gpus_per_worker} if run.gpus_per_worker else {})},
        ),
        run_config=run_config(run.name or "", storage_uri(run.storage_path, "out/.runs"), run.max_failures, callbacks),
    )
    result = trainer.fit()
    best, metrics, _ = best_checkpoint(result)
    return best, metrics, result
