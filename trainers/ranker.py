"""Training the second-stage ranker with Ray Train: `train_func(config)` runs on the worker; `train_ranker` drives.

The driver loads the bundle (no Ray), builds retrieval's top-N lists of the validation targets with their features
(`crossrec.ranker.build_lists`), and hands them to one Ray Train worker as a safetensors file: the lists are a
few hundred MB at most and an epoch takes seconds, so a second DDP rank would only add start-up. train_func is
the plain-PyTorch steps of `crossrec.ranker` plus the Ray lines (context, report, checkpoint I/O), marked `# ray`.
Epoch 0 reports the untrained ranker, which keeps retrieval's order: the best checkpoint is never worse than
retrieval on the held-out lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray.train  # ray
import ray.train.torch  # ray
import torch
from safetensors.torch import load_file, save_file

from crossrec.config import RankerConfig, RunSettings
from crossrec.early_stopping import VALID_METRIC, new_state, record_epoch
from crossrec.ranker import (
    FEATURES,
    RankedScorer,
    Ranker,
    RankerNet,
    RankLists,
    build_item_table,
    build_lists,
    fit_standardizer,
    ranker_epoch,
    rerank_ndcg,
    save_ranker,
)
from trainers.runtime import best_checkpoint, init_ray, run_config, setup_worker, storage_uri

__all__ = ["train_func", "train_ranker"]


def train_func(config: dict) -> None:
    """One Ray Train worker. config: {"ranker": RankerConfig dict, "lists": safetensors path, "n_domains",
    "seed", "threads"}."""
    cfg = RankerConfig(**config["ranker"])
    rank, world = setup_worker(config.get("threads", 1), config["seed"])  # ray: rank and world from Train's context
    lists = RankLists.from_tensors(load_file(config["lists"]))
    net = RankerNet(len(FEATURES), config["n_domains"], cfg.hidden, dropout=cfg.dropout)
    fit_standardizer(net, lists)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = new_state()
    ckpt = ray.train.get_checkpoint()  # ray
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
            opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
            state = json.loads(Path(folder, "state.json").read_text())
    model = ray.train.torch.prepare_model(net) if world > 1 else net  # ray
    while state["epoch"] <= cfg.epochs:
        epoch, t0 = state["epoch"], time.time()
        loss = 0.0
        if epoch > 0:  # epoch 0: the untrained ranker = retrieval's order, the baseline to beat
            loss = ranker_epoch(
                model,
                opt,
                lists,
                max(1, cfg.batch_size // world),
                np.random.default_rng([config["seed"], epoch]),
                rank,
                world,
            )
        m = rerank_ndcg(net, lists, "holdout")
        metrics = {
            VALID_METRIC: m["ndcg"],
            "valid/retrieval_ndcg@10": m["retrieval_ndcg"],
            "valid/lists": m["n"],
            "train/loss": loss,
            "epoch": epoch,
            "train/epoch_s": time.time() - t0,
        }
        stop = record_epoch(state, metrics, cfg.patience)
        if rank == 0:
            print(
                f"ranker epoch {epoch}/{cfg.epochs}  loss {loss:.4f}  holdout ndcg@10 {m['ndcg']:.4f} "
                f"(retrieval {m['retrieval_ndcg']:.4f})",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_file(
                    {k: v.detach().contiguous() for k, v in net.state_dict().items()},
                    os.path.join(tmp, "model.safetensors"),
                )
                torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
                Path(tmp, "state.json").write_text(json.dumps(state))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)  # ray
            ray.train.report(metrics, checkpoint=checkpoint)  # ray
        if stop:
            break


def _validation_lists(prefix: Path, bundle_version: str, data_hash: str, build, cfg: RankerConfig) -> Path:
    """The safetensors file of retrieval's top-N lists of the validation targets, built by `build()` once: they
    depend on the retriever, the data and the list settings only, so a rerun (say after a failed Ray start)
    reuses them. The file is what the Ray Train worker reads."""
    key = hashlib.sha256(
        json.dumps([bundle_version, data_hash, cfg.top_n, cfg.valid_fraction, cfg.graph]).encode()
    ).hexdigest()[:12]
    path = prefix.with_name(f"{prefix.name}-lists-{key}.safetensors")
    if not path.is_file():
        save_file({k: v.contiguous() for k, v in build().tensors().items()}, str(path))
    return path


def train_ranker(
    bundle_path: str | Path,
    data: str | Path,
    run: RunSettings | None = None,
    cfg: RankerConfig | None = None,
    progress: bool = True,
) -> dict:
    """Trains the ranker of a bundle on `data` (the dataset the bundle was trained on) and writes `ranker/` into
    the bundle. cfg: default the bundle's `ranker` section. Returns ranker.json's metrics."""
    from ray.train import ScalingConfig  # ray
    from ray.train.torch import TorchTrainer  # ray

    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.evaluation import evaluate
    from crossrec.graph import build_graph
    from crossrec.inference import bundle_retriever
    from crossrec.splits import splits_for

    run = run or RunSettings()
    bundle = load_bundle(bundle_path)
    cfg = cfg or bundle.config.ranker
    dataset = Dataset.load(data)
    splits = splits_for(dataset, bundle.config, training=True)  # what the retriever trained on
    t0 = time.time()
    retrieval = bundle_retriever(bundle, dataset, splits)
    graph = None
    if cfg.graph:
        g = bundle.config.graph
        graph = build_graph(dataset, splits, g.columns, g.co_interaction)
    items = build_item_table(splits, bundle.domains, graph)
    learned_dim, max_len = bundle.config.dim, bundle.config.max_len
    storage = Path(storage_uri(run.storage_path, Path(bundle_path).resolve().parent / ".runs"))
    storage.mkdir(parents=True, exist_ok=True)
    name = f"{run.name or Path(bundle_path).name}-ranker"
    lists_file = _validation_lists(
        storage / name,
        bundle.version,
        dataset.content_hash,
        lambda: build_lists(retrieval, splits, items, cfg, learned_dim, max_len, split="valid"),
        cfg,
    )
    lists = RankLists.from_tensors(load_file(str(lists_file)))
    t_lists = time.time() - t0
    if progress:
        print(
            f"ranker: {len(lists.label) + int(lists.missed.sum())} validation lists of top-{cfg.top_n}, "
            f"{len(lists.label)} contain the target ({t_lists:.0f}s)",
            flush=True,
        )

    init_ray(run.address)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "ranker": asdict(cfg),
            "lists": str(lists_file),
            "n_domains": len(bundle.domains),
            "seed": bundle.config.seed,
            "threads": max(1, int(run.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": run.cpus_per_worker}),
        run_config=run_config(name, str(storage)),
    )
    result = trainer.fit()
    t_fit = time.time() - t0 - t_lists
    best, _, history = best_checkpoint(result, "ranker training")
    net = RankerNet(len(FEATURES), len(bundle.domains), cfg.hidden, dropout=cfg.dropout)
    with best.as_directory() as folder:
        net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    lists_file.unlink(missing_ok=True)

    ranker = Ranker(net, items, cfg, learned_dim, max_len)
    t1 = time.time()
    test = evaluate(splits, RankedScorer(retrieval, ranker), split="test", progress=progress, desc="test (ranked)")
    t_test = time.time() - t1
    metrics = {
        "valid": max(history, key=lambda h: h[VALID_METRIC]),
        "history": history,
        "test": test.metrics,
        "test_retrieval": bundle.meta["metrics"]["test"],
        "n_targets": test.n_targets,
        "bundle_version": bundle.version,
        "time_s": {"lists": round(t_lists, 1), "fit": round(t_fit, 1), "test": round(t_test, 1)},
    }
    save_ranker(bundle_path, net, items, cfg, learned_dim, max_len, metrics)
    return metrics
