"""A bundle applied to a dataset: item vectors for its catalog and a scorer for evaluation or recommendation.

Items the bundle already has (same domain, same id) keep the bundle's vectors; any other item - a new item,
or a whole domain the model never saw (zero-shot) - is embedded from its text with the bundle's backbone and
adaptor. Domains the model never trained on use its "unknown" domain id.
"""

from __future__ import annotations

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
from crossrec.splits import Splits
from crossrec.training import ModelScorer

__all__ = [
    "domain_map_for",
    "catalog_vectors",
    "bundle_scorer",
    "backbone_vectors",
    "bundle_backbone",
    "has_domain_adapters",
    "calibrate_zero_shot",
    "catalog_pop",
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


def bundle_scorer(
    bundle: Bundle, data: Dataset, splits: Splits, progress: bool = False, domains: list[str] | None = None
) -> ModelScorer:
    """The bundle's retrieval scorer over `splits`' catalog, with the popularity and transition priors it was
    trained with; their weights in each of `domains` (default: all), the domains to be scored, are reported in
    `params`."""
    scorer = ModelScorer(
        bundle.model, catalog_vectors(bundle, data, splits, progress), splits, domain_map_for(bundle.domains, splits)
    )
    weights = {d: w for d, w in bundle.pop_weights.items() if d in splits.domain_code}
    if weights:
        scorer.pop = catalog_pop(bundle, splits)
        scorer.pop_weight = weights
        shown = {d: w for d, w in weights.items() if domains is None or d in domains}
        if shown:
            scorer.params = {f"pop_weight[{d}]": round(w, 6) for d, w in shown.items()}
    co = {d: bw for d, bw in bundle.co_weights.items() if d in splits.domain_code}
    pairs = bundle.co_pairs() if co else None
    if pairs is not None:
        from crossrec.transitions import Transitions

        names = [splits.domains[k] for k in splits.item_domain]
        index = {(d, str(i)): k for k, (d, i) in enumerate(zip(names, splits.item_ids))}
        scorer.co = Transitions.from_table(pairs, index, len(splits.item_ids))
        scorer.co_weight = co
        shown_co = {d: bw for d, bw in co.items() if domains is None or d in domains}
        if shown_co:
            scorer.params = {
                **getattr(scorer, "params", {}),
                **{f"co_weight[{d}]": f"{b:.6g} (decay {c:g})" for d, (b, c) in shown_co.items()},
            }
    return scorer


def catalog_pop(bundle: Bundle, splits: Splits) -> torch.Tensor:
    """(N,) the popularity prior's p of `splits`' catalog from the bundle (as Serve's Recommender reads it): the
    bundle's value for its items, that of zero interactions (`Bundle.pop_cold`) for an item of a bundle domain
    the bundle lacks, 0 in domains the bundle never saw."""
    out = torch.zeros(len(splits.item_ids))
    for d in splits.domains:
        if d not in bundle.items:
            continue
        pop = bundle.item_pop(d)
        if pop is None:
            continue
        pos = dict(zip(bundle.items[d].column("item_id").to_pylist(), pop.tolist()))
        off, n = splits.offset[d], splits.n_items[d]
        cold = bundle.pop_cold(d)
        out[off : off + n] = torch.tensor([pos.get(i, cold) for i in splits.item_ids[off : off + n]])
    return out


LEARNED_WEIGHTS = (1.0, 0.5, 0.25, 0.0)


def calibrate_zero_shot(scorer: ModelScorer, domains: list[str] | None = None, max_targets: int = 1500) -> dict | None:
    """Zero-shot on a dataset the bundle never saw, calibrated on that dataset's validation split as the
    textknn baseline is fitted there: the text prior's recency decay and cross-domain weight (textknn's grid
    over the prior's own vectors), then the weight of the learned part against the prior (LEARNED_WEIGHTS; 0
    leaves exactly the prior: the learned part did not transfer) together with, when the bundle's config has
    `pop_prior`, the popularity prior's gamma and window per domain (crossrec.pop_prior, popularity from this
    dataset's training window: what the popularity baseline counts; gamma 0 is on the grid). No weight of the
    model is trained. Changes `scorer` (and its model's config) in place and returns the chosen values (also
    `scorer.params`), or None for a model without a text prior."""
    import dataclasses

    from crossrec.baselines.textknn import fit_textknn
    from crossrec.pop_prior import GRID, apply_pop_prior, choose_pop_prior

    model = scorer.model
    if not model.text_prior:
        return None
    domains = list(domains or scorer.catalog.domains)
    knn = fit_textknn(scorer.catalog, scorer.vecs[:, model.cfg.dim :].numpy(), domains=domains, max_targets=max_targets)
    model.cfg = dataclasses.replace(model.cfg, text_prior_decay=knn.decay, text_prior_cross=knn.cross_weight)
    grid = GRID if model.cfg.pop_prior else (0.0,)
    best, best_score, best_pop = 1.0, -1.0, {}
    for w in LEARNED_WEIGHTS:  # ties keep the larger weight: the model as trained
        scorer.learned_weight = w
        # gamma = 0 on the grid scores exactly the model without the prior (what this loop chose before it).
        choices = choose_pop_prior(scorer, domains, max_targets, grid=grid)
        score = float(np.mean([choices[d].valid_ndcg10 for d in domains]))
        if score > best_score:
            best, best_score, best_pop = w, score, choices
    scorer.learned_weight = best
    apply_pop_prior(scorer, best_pop)
    scorer.params = {"text_prior_decay": knn.decay, "text_prior_cross": knn.cross_weight, "learned_weight": best}
    if model.cfg.pop_prior:
        for d, ch in best_pop.items():
            scorer.params[f"pop_weight[{d}]"] = round(ch.weight, 6)
            scorer.params[f"pop_window[{d}]"] = ch.window
            scorer.params[f"pop_valid_ndcg10[{d}]"] = f"{ch.base_ndcg10:.4f} -> {ch.valid_ndcg10:.4f}"
    return scorer.params
