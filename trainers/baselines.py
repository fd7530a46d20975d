"""Baselines that need training: an ID-based SASRec, trained by the same `train_func` as crossrec.

SASRec (Kang & McAuley, ICDM 2018) is the model with `item_encoder: id`: an embedding per item instead of
the text adaptor, the same causal user tower and InfoNCE loss. Its bundle is cached per dataset and config,
so `crossrec evaluate --baselines sasrec` trains once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from crossrec.backbones import cache_dir
from crossrec.bundle import is_bundle, load_bundle
from crossrec.config import RunSettings, TrainConfig, config_to_dict
from crossrec.dataset import Dataset
from crossrec.inference import bundle_retriever
from crossrec.splits import Splits

__all__ = ["SASREC", "sasrec_scorer"]

# The usual SASRec settings for sparse Amazon data; dropout is high because ID embeddings overfit fast. The
# baseline is SASRec as published: no prior (crossrec.priors).
SASREC = dict(
    item_encoder="id",
    dim=64,
    layers=2,
    heads=2,
    dropout=0.3,
    lr=1e-3,
    epochs=30,
    patience=3,
    domain_dropout=0.0,
    priors=[],
)


def sasrec_scorer(
    data_path: str | Path,
    data: Dataset,
    splits: Splits,
    address: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
):
    from trainers.pipeline import train_bundle

    proto = {k: v for k, v in splits.protocol_info.items() if k != "min_per_domain"}  # trained on the same split
    cfg = TrainConfig(**{**SASREC, "min_per_domain": splits.min_per_domain, **proto, **(overrides or {})})
    key = hashlib.sha256(json.dumps([data.content_hash, config_to_dict(cfg)], sort_keys=True).encode())
    out = cache_dir() / "baselines" / f"sasrec-{key.hexdigest()[:16]}"
    if not is_bundle(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        train_bundle(data_path, out, cfg, RunSettings(workers=2, address=address), progress=progress)
    return bundle_retriever(load_bundle(out), data, splits, progress)
