"""A bundle applied to a dataset: item vectors for its catalog and a scorer for evaluation or recommendation.

Items the bundle already has (same domain, same id) keep the bundle's vectors; any other item - a new item,
or a whole domain the model never saw (zero-shot) - is embedded from its text with the bundle's backbone and
adaptor. Domains the model never trained on use its "unknown" domain id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from crossrec.backbones import Backbone, load_backbone
from crossrec.bundle import Bundle
from crossrec.dataset import Dataset
from crossrec.domains import domain_ids
from crossrec.embedding import (
    cached_text_vectors,
    catalog_texts,
    embed_texts,
    load_cached_vectors,
    save_cached_vectors,
    template_of,
    vector_cache_path,
)
from crossrec.retrieval import Retriever
from crossrec.splits import Splits

if TYPE_CHECKING:
    from crossrec.priors import Prior

__all__ = [
    "domain_map_for",
    "catalog_vectors",
    "bundle_retriever",
    "backbone_vectors",
    "bundle_backbone",
    "has_domain_adapters",
    "calibrate_zero_shot",
]


def bundle_backbone(bundle: Bundle, domain: str | None = None) -> Backbone:
    """The backbone that turns text into the vectors `bundle.model.item_vectors` expects. The one place that
    decides how a bundle's backbone is loaded (serving's Encoder calls it), so bundles with a fine-tuned
    backbone only change this function. End-to-end bundles carry `adapter/` (a peft LoRA adapter, merged into
    the base here, or a full fine-tuned model): new items are then embedded by the adapted backbone. With
    per-domain adapters (`has_domain_adapters`) the backbone depends on the text's `domain`: its adapter, or
    the base backbone for a domain the bundle never trained."""
    adapter = bundle.path / "adapter"
    if adapter.is_dir():
        from crossrec.finetune import load_adapted_backbone

        return load_adapted_backbone(bundle.config.backbone, adapter, domain=domain)
    return load_backbone(bundle.config.backbone)


def has_domain_adapters(bundle: Bundle) -> bool:
    from crossrec.finetune import domain_adapters

    return bool(domain_adapters(bundle.path / "adapter"))


def domain_map_for(bundle_domains: list[str], splits: Splits) -> np.ndarray:
    """Dataset domain code -> model domain id (unknown = len(bundle_domains))."""
    return domain_ids(bundle_domains, splits.domains)


def backbone_vectors(
    data: Dataset, splits: Splits, backbone: str, text_template: str, max_tokens: int, progress: bool = False
) -> np.ndarray:
    """Frozen-backbone vectors of the catalog in `splits`' global item order, cached on disk."""
    items = data.items.take(splits.item_row)
    template = template_of(text_template, max_tokens)
    texts = catalog_texts(items, template)
    path = vector_cache_path(splits.item_ids.tolist(), texts, backbone, template)
    vecs = load_cached_vectors(path, len(texts))
    if vecs is None:  # assembled from the per-text store: only texts never embedded before are encoded
        vecs, _ = cached_text_vectors(
            texts, backbone, max_tokens, lambda new: embed_texts(new, backbone, max_tokens, progress=progress), progress
        )
        save_cached_vectors(path, vecs)
    return vecs


def catalog_vectors(bundle: Bundle, data: Dataset, splits: Splits, progress: bool = False) -> torch.Tensor:
    n = len(splits.item_ids)
    dim = bundle.model.vector_dim
    out = torch.zeros(n, dim)
    have = np.zeros(n, dtype=bool)
    for d in splits.domains:
        if d not in bundle.items:
            continue
        ids, vecs = bundle.item_matrix(d)
        pos = {iid: k for k, iid in enumerate(ids)}
        off = splits.offset[d]
        for j, iid in enumerate(splits.item_ids[off : off + splits.n_items[d]]):
            k = pos.get(iid)
            if k is not None:
                out[off + j] = vecs[k]
                have[off + j] = True
    missing = np.flatnonzero(~have)
    if len(missing):
        cfg = bundle.config
        if cfg.item_encoder != "text":
            raise ValueError(
                f"{len(missing)} items of the dataset are not in the bundle, and an ID-based model "
                "(item_encoder id) cannot embed new items"
            )
        if (bundle.path / "adapter").is_dir():
            # A fine-tuned backbone is the bundle's own: embed just the missing items with it (no shared cache).
            texts = catalog_texts(
                data.items.take(splits.item_row[missing]), template_of(cfg.text_template, cfg.max_tokens)
            )
            if has_domain_adapters(bundle):  # each domain through its own adapter (base for a new domain)
                bb = np.zeros((len(missing), bundle.meta["in_dim"]), np.float32)
                dom = splits.item_domain[missing]
                for code in np.unique(dom):
                    at = np.flatnonzero(dom == code)
                    bb[at] = bundle_backbone(bundle, splits.domains[code]).encode(
                        [texts[i] for i in at], max_length=cfg.max_tokens, progress=progress
                    )
            else:
                bb = bundle_backbone(bundle).encode(texts, max_length=cfg.max_tokens, progress=progress)
            rows = np.arange(len(missing))
        else:
            # Embed the whole catalog once (cached), then keep the rows that are needed.
            bb = backbone_vectors(data, splits, cfg.backbone, cfg.text_template, cfg.max_tokens, progress)
            rows = missing
        with torch.inference_mode():
            for s in range(0, len(missing), 4096):
                out[missing[s : s + 4096]] = bundle.model.item_vectors(torch.from_numpy(bb[rows[s : s + 4096]]))
    return out


def bundle_retriever(
    bundle: Bundle, data: Dataset, splits: Splits, progress: bool = False, domains: list[str] | None = None
) -> Retriever:
    """The bundle's retrieval over `splits`' catalog, with the priors it was trained with mapped onto it; their
    weights in each of `domains` (default: all), the domains to be scored, are reported in `params`."""
    from crossrec.priors import load_priors

    retriever = Retriever(
        bundle.model,
        splits,
        catalog_vectors(bundle, data, splits, progress),
        bundle.domains,
        load_priors(bundle, splits),
        learned_weight=bundle.learned_weight,
        calibration=bundle.calibration,
    )
    shown = [d for d in splits.domains if domains is None or d in domains]
    for p in retriever.priors:
        retriever.params.update(p.params(shown))
    return retriever


LEARNED_WEIGHTS = (1.0, 0.5, 0.25, 0.0)


def calibrate_zero_shot(
    retriever: Retriever, domains: list[str] | None = None, max_targets: int = 1500, refit: str = "calibrating"
) -> dict | None:
    """Zero-shot on domains the bundle never trained on, calibrated on their validation targets as the textknn
    baseline is fitted there: the text prior's recency decay and cross-domain weight (textknn's grid over the
    prior's own vectors), then the weight of the learned part against the prior (LEARNED_WEIGHTS; 0 leaves exactly
    the prior: the learned part did not transfer) together with the weights of the priors refitted on this
    dataset's training window: `refit` "calibrating" refits those that calibrate (`Prior.calibrates`: popularity,
    searched even when the bundle's config leaves it out, then on a grid of 0 alone), "all" every prior of the
    config in its order (`crossrec adapt`: the new domain's own logs give transitions into it too). No weight of the
    model is trained. Sets `retriever.calibration` of `domains` (crossrec.calibration.Calibration) and its priors
    (clones: the bundle's choices stay for other domains) and returns the chosen values (also `retriever.params`),
    or None for a model without a text prior."""
    from crossrec.baselines.textknn import fit_textknn
    from crossrec.calibration import Calibration
    from crossrec.priors import make_prior
    from crossrec.priors.base import choose

    if refit not in ("calibrating", "all"):
        raise ValueError(f"`refit` must be one of calibrating, all, got {refit!r}")
    model = retriever.model
    if not model.text_prior:
        return None
    splits = retriever.catalog
    assert isinstance(splits, Splits)
    domains = list(domains or splits.domains)
    knn = fit_textknn(splits, retriever.vecs[:, model.cfg.dim :].numpy(), domains=domains, max_targets=max_targets)
    names = list(model.cfg.priors)

    def refits(p: Prior) -> bool:
        return p.calibrates or (refit == "all" and p.spec in names)

    # Copies: a shallow copy of the retriever (the as-trained model beside the calibrated one) keeps its own.
    retriever.priors = [p.clone() if refits(p) else p for p in retriever.priors]
    retriever.calibration = dict(retriever.calibration)
    if not any(p.spec == "popularity" for p in retriever.priors):
        retriever.priors.insert(0, make_prior("popularity", splits))
    for spec in names if refit == "all" else ():  # a prior the bundle stored nothing of (off everywhere)
        if not any(p.spec == spec for p in retriever.priors):
            retriever.priors.append(make_prior(spec, splits))
    retriever.priors.sort(key=lambda p: names.index(p.spec) if p.spec in names else -1)
    fresh = [p for p in retriever.priors if refits(p)]
    for p in fresh:
        p.fit(splits)

    def calibrate(weight: float) -> None:
        for d in domains:
            retriever.calibration[d] = Calibration(weight, knn.decay, knn.cross_weight)

    best, best_score, best_choices = 1.0, -1.0, {}
    for w in LEARNED_WEIGHTS:  # ties keep the larger weight: the model as trained
        calibrate(w)
        # In order, each on the model plus the priors before it (installed: the next one's base includes it).
        choices = {
            p.spec: choose(retriever, p, domains, max_targets, None if p.spec in names else (0.0,)) for p in fresh
        }
        last = choices[fresh[-1].spec]  # the whole stack's validation NDCG@10
        score = float(np.mean([last[d].valid_ndcg10 for d in domains]))
        if score > best_score:
            best, best_score, best_choices = w, score, choices
    calibrate(best)
    for p in fresh:
        p.install(best_choices[p.spec])
    retriever.priors = [p for p in retriever.priors if p.spec in names or not p.calibrates]
    retriever.params = {"text_prior_decay": knn.decay, "text_prior_cross": knn.cross_weight, "learned_weight": best}
    for p in fresh:
        if p.spec in names:
            for d, ch in best_choices[p.spec].items():
                retriever.params[f"{p.short}_weight[{d}]"] = round(ch.weight, 6)
                retriever.params[f"{p.short}_{p.option_name}[{d}]"] = ch.option
                retriever.params[f"{p.short}_valid_ndcg10[{d}]"] = f"{ch.base_ndcg10:.4f} -> {ch.valid_ndcg10:.4f}"
    return retriever.params
