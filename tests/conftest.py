"""Shared fixtures: small real slices of the shared data (tests/data), prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]

# Nothing in the test run may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def art_office_csv() -> Path:
    return DATA / "amazon-art-office-mini"


@pytest.fixture(scope="session")
def food_kitchen_csv() -> Path:
    return DATA / "amazon-food-kitchen-mini"


@pytest.fixture(scope="session")
def art_office(tmp_path_factory, art_office_csv) -> Path:
    from crossrec.dataset import prepare

    out = tmp_path_factory.mktemp("prepared") / "ao"
    prepare([art_office_csv], out, progress=False)
    return out


@pytest.fixture(scope="session")
def food_kitchen(tmp_path_factory, food_kitchen_csv) -> Path:
    from crossrec.dataset import prepare

    out = tmp_path_factory.mktemp("prepared") / "fk"
    prepare([food_kitchen_csv], out, progress=False)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, no dashboard, small object store), shut down at the end."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray

    # Ray libraries log at ERROR, as `trainers.train.init_ray` does: without a dashboard Train's placement-group
    # cleaner would warn every few seconds that the state API is unavailable.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        logging_level="WARNING",
        logging_config=ray.LoggingConfig(log_level="ERROR"),
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _subset(src: Path, dst: Path, n_users: int, extra_items: int = 30, cross_domain: bool = False) -> Path:
    """The first n_users of a real slice (file order) with their items, plus a few untouched items per domain.
    cross_domain: only users with interactions in more than one domain (the shared datasets list single-domain
    users first, so their first users cover one domain)."""
    import csv

    dst.mkdir(parents=True)
    with open(src / "interactions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    domains: dict[str, set] = {}
    for r in rows:
        domains.setdefault(r["user_id"], set()).add(r["domain"])
    users = [u for u in domains if not cross_domain or len(domains[u]) > 1][:n_users]
    keep = set(users)
    rows = [r for r in rows if r["user_id"] in keep]
    used = {r["item_id"] for r in rows}
    with open(src / "items.csv", newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f))
    extra: dict[str, int] = {}
    kept = []
    for it in items:
        if it["item_id"] in used:
            kept.append(it)
        elif extra.get(it["domain"], 0) < extra_items:
            extra[it["domain"]] = extra.get(it["domain"], 0) + 1
            kept.append(it)
    for name, table in (("interactions.csv", rows), ("items.csv", kept)):
        with open(dst / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return dst


@pytest.fixture(scope="session")
def tiny_fk(tmp_path_factory, food_kitchen_csv) -> Path:
    """~120 real food-kitchen users (both domains), prepared: small enough to embed and train in seconds."""
    from crossrec.dataset import prepare

    root = tmp_path_factory.mktemp("tiny")
    out = root / "fk"
    prepare([_subset(food_kitchen_csv, root / "fk-src", 120)], out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ao(tmp_path_factory, art_office_csv) -> Path:
    """~20 real art-office users, prepared (a second dataset for zero-shot transfer)."""
    from crossrec.dataset import prepare

    root = tmp_path_factory.mktemp("tiny")
    out = root / "ao"
    prepare([_subset(art_office_csv, root / "ao-src", 20)], out, progress=False)
    return out


@pytest.fixture(scope="session")
def micro_fk(tmp_path_factory, food_kitchen_csv) -> Path:
    """The first 30 real food-kitchen users (+5 untouched items per domain), prepared: end-to-end fine-tuning
    runs the backbone on every batch, so its tests need the smallest real slice."""
    from crossrec.dataset import prepare

    root = tmp_path_factory.mktemp("micro")
    out = root / "fk"
    prepare([_subset(food_kitchen_csv, root / "fk-src", 30, extra_items=5)], out, progress=False)
    return out


@pytest.fixture(scope="session")
def vector_cache(tmp_path_factory):
    """Backbone vectors of the tiny slices cached once per test session (each slice is embedded once, whichever
    module needs it first), away from the user's cache; yields the folder."""
    old = os.environ.get("CROSSREC_CACHE_DIR")
    path = tmp_path_factory.mktemp("cache")
    os.environ["CROSSREC_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["CROSSREC_CACHE_DIR"]
    else:
        os.environ["CROSSREC_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def cross_fk(tmp_path_factory, food_kitchen_csv) -> Path:
    """The real food-kitchen slice's users with both domains (73), prepared: the cold-user protocol's population."""
    from crossrec.dataset import prepare

    root = tmp_path_factory.mktemp("cross")
    out = root / "fk"
    prepare([_subset(food_kitchen_csv, root / "fk-src", 200, extra_items=10, cross_domain=True)], out, progress=False)
    return out


# -- helpers shared by the prior tests (test_pop_prior, test_co_prior) ----------------------------------------
def fk_items(food_kitchen_csv: Path, n: int) -> dict[str, list[dict]]:
    """The first n real items (their rows of items.csv) of each domain of the food-kitchen slice."""
    import csv

    with open(food_kitchen_csv / "items.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {d: [r for r in rows if r["domain"] == d][:n] for d in ("food", "kitchen")}


def prepare_constructed(folder: Path, items: list[dict], interactions: list[dict]) -> Path:
    """Writes items.csv and interactions.csv under folder/src and prepares them as folder/fk."""
    import csv

    from crossrec.dataset import prepare

    src = folder / "src"
    src.mkdir()
    for name, table in (("items.csv", items), ("interactions.csv", interactions)):
        with open(src / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    prepare([src], folder / "fk", progress=False)
    return folder / "fk"


def untrained_cold_user_setup(path: Path):
    """Cold-user splits (cold_fraction 0.5) of the prepared slice at `path` and an untrained text model: it starts
    as textknn (adaptor on the catalog's principal components, the text prior at its initial weight). Returns
    (data, splits, config, model, item vectors, a function making a fresh Retriever without priors)."""
    import torch

    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.retrieval import Retriever
    from crossrec.splits import Splits

    data = Dataset.load(path)
    sp = Splits(data, protocol="cold-user", cold_fraction=0.5)
    vecs = torch.from_numpy(backbone_vectors(data, sp, "minilm", "", 64))
    cfg = TrainConfig(
        dim=32, layers=1, text_prior_decay=0.6, text_prior_cross=0.1, protocol="cold-user", cold_fraction=0.5
    )
    torch.manual_seed(0)
    model = CrossRecModel(cfg, len(sp.domains), in_dim=vecs.shape[1]).eval()
    model.adaptor.init_from_vectors(vecs)
    with torch.inference_mode():
        item_vecs = model.item_vectors(vecs)

    def scorer():
        return Retriever(model, sp, item_vecs, sp.domains)

    return data, sp, cfg, model, item_vecs, scorer


def bundle_items(data, sp, item_vecs) -> dict:
    """save_bundle's `items`: per domain (ids, titles, vectors) in the splits' catalog order."""
    titles = data.items.take(sp.item_row).column("title").to_pylist()
    return {
        d: (
            sp.item_ids[sp.offset[d] : sp.offset[d] + sp.n_items[d]].tolist(),
            titles[sp.offset[d] : sp.offset[d] + sp.n_items[d]],
            item_vecs[sp.offset[d] : sp.offset[d] + sp.n_items[d]].numpy(),
        )
        for d in sp.domains
    }


def fit_priors(retriever, names: list[str], domains: list[str] | None = None) -> dict:
    """Adds the named priors to `retriever` (over its Splits), fits them on the training rows and chooses their
    weights on validation in order, as training's end does. Returns {name: {domain: Choice}}."""
    from crossrec.priors import make_prior
    from crossrec.priors.base import choose

    out = {}
    for name in names:
        prior = make_prior(name, retriever.catalog)
        retriever.priors.append(prior)
        prior.fit(retriever.catalog)
        out[name] = choose(retriever, prior, domains)
    return out


def save_with_priors(path, data, sp, cfg, model, item_vecs, retriever):
    """A bundle of the untrained setup's model with `retriever`'s priors (save_bundle)."""
    from crossrec.bundle import BundleContents, save_bundle

    contents = BundleContents(
        model,
        cfg,
        list(sp.domains),
        bundle_items(data, sp, item_vecs),
        {},
        data.content_hash,
        in_dim=384,
        priors=retriever.priors,
    )
    return save_bundle(path, contents)
