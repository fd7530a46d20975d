"""Adapting a bundle to domains its model never trained on (`crossrec adapt`): what `crossrec evaluate` fits for a
zero-shot domain, fitted once on the new domain's own logs and written into a new bundle, so that evaluation, the
in-process Recommender and Serve answer in that domain with nothing fitted at request time.

For each new domain, on the adapt dataset's validation targets of that domain (crossrec.inference.
calibrate_zero_shot with every prior refitted): the text prior's recency decay and cross-domain weight, the learned
part's weight against the text prior (crossrec.calibration.Calibration), and every configured prior refitted on the
dataset's training window and weighted there (popularity; transitions into the domain, from any item, when its
logs have them). The new bundle holds the bundle's model, items, priors and indexes unchanged for its other
domains, plus the new domain's catalog embedded by the bundle's backbone, its calibration (bundle.json "adapted")
and its share of each prior. A domain without validation targets gets the model as trained with its text prior
(text only): nothing can be chosen without targets. No weight of the model is trained: `crossrec train --init`
does that once the domain has enough logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossrec.bundle import Bundle, BundleContents, save_bundle
from crossrec.calibration import MIN_TARGETS, TEXT_ONLY, Calibration
from crossrec.catalog import BundleCatalog
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.splits import Splits, splits_for

__all__ = ["Adapted", "adapt_bundle"]

# bundle.json entries that save_bundle writes itself or that describe what is not carried (a ranker is trained on
# the old retriever's lists: it is left out, as any rewrite of a bundle leaves it out).
_OWN = {
    "format",
    "created_by",
    "created_at",
    "version",
    "config",
    "domains",
    "in_dim",
    "n_items",
    "data_hash",
    "metrics",
    "priors",
    "retrieval",
    "files",
    "content_hash",
    "ranker",
    "adapted",
}


@dataclass
class Adapted:
    """What `adapt_bundle` did, per new domain."""

    path: Path
    domains: list[str]
    params: dict  # the values chosen on validation (calibrate_zero_shot's)
    uses: dict[str, list[str]]  # domain -> the parts that carry weight: "text", "model", "popularity", ...
    n_train: dict[str, int]  # training interactions of the domain in the adapt dataset
    n_valid: dict[str, int]  # its validation targets
    test: dict[str, dict] = field(default_factory=dict)  # domain -> test metrics on the adapt dataset
    notes: list[str] = field(default_factory=list)
    time_s: float = 0.0


def adapt_bundle(
    bundle: Bundle,
    data: Dataset,
    domains: list[str],
    out: str | Path,
    data_path: str | Path | None = None,
    splits: Splits | None = None,
    progress: bool = False,
    max_targets: int = 1500,
    min_targets: int = MIN_TARGETS,
) -> Adapted:
    """Writes to `out` a bundle that is `bundle` plus `domains` (new to its model) calibrated on `data`. A domain
    with fewer than `min_targets` validation targets is not calibrated (a choice among the grid's values on a few
    targets follows noise): it scores with text only (TEXT_ONLY)."""
    from crossrec.index import IvfIndex
    from crossrec.inference import bundle_retriever, calibrate_zero_shot
    from crossrec.priors import make_prior, prior_class

    t0 = time.time()
    cfg = bundle.config
    trained = [d for d in domains if d in bundle.domains]
    if trained:
        raise ValueError(
            f"`--domains`: the model trained on {', '.join(trained)}; adapt adds domains it never trained on "
            "(to update a trained domain on new logs: crossrec train --init BUNDLE)"
        )
    if not domains:
        raise ValueError("`--domains`: name at least one new domain")
    if cfg.item_encoder != "text" or not bundle.model.text_prior:
        raise ValueError(
            "the bundle's model has no text prior (item_encoder id or text_prior false): "
            "only a text model can embed a new domain's items"
        )
    splits = splits or splits_for(data, cfg)
    missing = [d for d in domains if d not in splits.domains]
    if missing:
        raise ValueError(
            f"`--domains`: {missing[0]!r} is not a domain of the dataset (its domains: {', '.join(splits.domains)})"
        )
    retriever = bundle_retriever(bundle, data, splits, progress=progress, domains=domains)
    n_valid = {d: len(splits.targets("valid", d)) for d in domains}
    train_rows = np.flatnonzero(splits.is_train)
    n_train = {
        d: int((splits.row_domain[train_rows] == splits.domain_code[d]).sum()) if len(train_rows) else 0
        for d in domains
    }
    fitted = [d for d in domains if n_valid[d] >= max(1, min_targets)]
    notes = []
    params: dict = {}
    if fitted:
        params = calibrate_zero_shot(retriever, fitted, max_targets=max_targets, refit="all") or {}
    for d in domains:
        if d in fitted:
            continue
        _, decay, cross = retriever.setting(None)
        assert decay is not None and cross is not None  # a trained text model chose them
        retriever.calibration[d] = Calibration(TEXT_ONLY, decay, cross)
        why = (
            f"no validation targets ({n_train[d]} training interactions)"
            if not n_valid[d]
            else f"{n_valid[d]} validation targets, fewer than the {min_targets} a choice of weights needs "
            f"(one hit moves NDCG@10 by ~{1 / n_valid[d]:.2f})"
        )
        notes.append(
            f"{d}: {why}: text only (its items' text vectors with the bundle's text prior, no priors); adapt again "
            "when the domain has more logs" + (" (or lower --min-targets)" if n_valid[d] else "")
        )
    test = {}
    scored = [d for d in domains if n_valid[d]]
    if scored:
        res = evaluate(splits, retriever, split="test", domains=scored)
        test = {d: {**res.metrics[d], "n_targets": res.n_targets[d]} for d in scored}

    # The new bundle's catalog: its own domains as they are, the new ones from the dataset.
    kept = [d for d in bundle.items if d not in domains]
    ids = {d: bundle.item_matrix(d)[0] for d in kept}
    ids.update({d: retriever.ids(d) for d in domains})
    catalog = BundleCatalog.of(ids)
    titles = data.items.take(splits.item_row).column("title").to_pylist()
    items = {d: (ids[d], bundle.items[d].column("title").to_pylist(), bundle.item_matrix(d)[1].numpy()) for d in kept}
    for d in domains:
        off, n = splits.offset[d], splits.n_items[d]
        items[d] = (ids[d], titles[off : off + n], retriever.rows(d).numpy())

    # Each configured prior: the bundle's, mapped onto the new catalog, with the new domains' share adopted from the
    # prior fitted on the dataset (or from an empty one: a domain without targets has no weight).
    priors = []
    for spec in cfg.priors:
        merged = prior_class(spec).load(bundle, catalog) or make_prior(spec, catalog)
        merged.spec = spec
        source = next((p for p in retriever.priors if p.spec == spec), None)
        if source is not None and fitted:
            merged.adopt(source, fitted)
        empty = [d for d in domains if d not in fitted]
        if empty:
            merged.adopt(make_prior(spec, splits), empty)
        priors.append(merged)
    uses = {}
    for d in domains:
        lw = retriever.calibration[d].learned_weight
        uses[d] = ["text", *(["model"] if lw else []), *(p.spec for p in priors if p.weight.get(d))]

    # ANN indexes: the bundle's for its own domains, new ones for large new domains.
    indexes = {}
    for d, spec in ((bundle.meta.get("retrieval") or {}).get("index") or {}).items():
        if d in kept and spec["n"] == len(ids[d]):
            indexes[d] = IvfIndex.load(bundle.path / spec["file"], spec["nprobe"])
    big = [d for d in domains if cfg.retrieval.builds_index(splits.n_items[d])]
    if big:
        retriever.ann_candidates = cfg.retrieval.candidates
        retriever.build_indexes(cfg.retrieval.nprobe, big, tune_on=256 if fitted else 0)
        indexes.update({d: index for d in big if isinstance(index := retriever.index[d], IvfIndex)})

    adapted = dict(bundle.meta.get("adapted") or {})
    for d in domains:
        adapted[d] = {
            "calibration": retriever.calibration[d].to_dict(),
            "uses": uses[d],
            "dataset": str(data_path) if data_path is not None else None,
            "data_hash": data.content_hash,
            "n_train_interactions": n_train[d],
            "n_valid_targets": n_valid[d],
            "test": test.get(d),
            "adapted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    adapter = bundle.path / "adapter"
    path = save_bundle(
        out,
        BundleContents(
            model=bundle.model,
            config=cfg,
            domains=bundle.domains,
            items=items,
            metrics=bundle.meta.get("metrics", {}),
            data_hash=bundle.meta["data_hash"],
            in_dim=bundle.meta.get("in_dim"),
            n_items=bundle.meta.get("n_items"),
            priors=priors,
            adapter_dir=adapter if adapter.is_dir() else None,
            indexes=indexes,
            extra={
                **{k: v for k, v in bundle.meta.items() if k not in _OWN and not _is_prior_key(k)},
                "adapted": adapted,
                "adapted_from": bundle.version,
            },
        ),
    )
    if bundle.has_ranker:
        notes.append("the bundle's ranker is not carried (it was trained on the old lists): retrain it to use one")
    return Adapted(
        path=path,
        domains=list(domains),
        params=params,
        uses=uses,
        n_train=n_train,
        n_valid=n_valid,
        test=test,
        notes=notes,
        time_s=round(time.time() - t0, 1),
    )


def _is_prior_key(key: str) -> bool:
    from crossrec.priors import REGISTRY

    return key in {cls.meta_key for cls in REGISTRY.values()}
