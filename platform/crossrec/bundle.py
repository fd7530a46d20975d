"""A trained model as a folder, loadable without Ray. Never pickle: JSON, safetensors and Parquet only.

bundle.json          format version, config, domains, backbone reference, data hash, metrics, version
model.safetensors    adaptor (or item embeddings) + user tower + temperature
items/DOMAIN.parquet item_id, title, vector (D floats): the model's vectors of that domain's catalog
                     (also of the domains `crossrec adapt` added: bundle.json "adapted", with their calibration)
index/DOMAIN.faiss   an ANN index of the domain's items (crossrec.index), for large catalogs; bundle.json "retrieval"
PRIOR files          each prior's own (crossrec.priors: pop_prior.parquet, co_prior.parquet), its weights and choices
                     in bundle.json under its key, the priors' order in bundle.json "priors"
adapter/             PEFT adapter of the backbone (end-to-end LoRA runs)
ranker/              second-stage ranker (crossrec.ranker: ranker.json, safetensors, items.parquet), optional
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

import crossrec
from crossrec.atomic import file_sha256, publishing
from crossrec.calibration import Calibration
from crossrec.config import TrainConfig, config_from_dict, config_to_dict
from crossrec.domains import domain_id, domain_ids
from crossrec.model import CrossRecModel
from crossrec.schema import check_domain

if TYPE_CHECKING:
    from crossrec.index import IvfIndex
    from crossrec.priors import Prior

__all__ = [
    "Bundle",
    "BundleContents",
    "save_bundle",
    "load_bundle",
    "is_bundle",
    "bundle_meta",
    "served_domains",
    "check_init",
    "verify_bundle",
    "bundle_content_hash",
    "BUNDLE_FORMAT",
]

BUNDLE_FORMAT = 1


@dataclass
class Bundle:
    path: Path
    meta: dict
    config: TrainConfig
    model: CrossRecModel
    domains: list[str]  # the model's domain ids, in order; id len(domains) = unknown
    items: dict[str, pa.Table]  # per domain: item_id, title, vector

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def content_hash(self) -> str | None:
        """sha256 over the files `save_bundle` wrote (see `verify_bundle`); None for bundles older than it."""
        return self.meta.get("content_hash")

    @property
    def has_ranker(self) -> bool:
        """A ranker was trained for this model (`crossrec.ranker.load_ranker` loads it); rewriting the bundle
        drops it, so it never outlives the retriever it was trained on."""
        return (self.path / "ranker" / "ranker.json").is_file()

    def domain_id(self, name: str) -> int:
        return domain_id(self.domains, name)

    @property
    def adapted(self) -> list[str]:
        """Domains the model never trained on that `crossrec adapt` added: their catalog, calibration and priors."""
        return list(self.meta.get("adapted") or {})

    @property
    def catalog_domains(self) -> list[str]:
        """Every domain the bundle has items of and answers in (`served_domains`)."""
        return served_domains(self.meta)

    @property
    def calibration(self) -> dict[str, Calibration]:
        """Adapted domain -> how its user vectors are put together (crossrec.calibration.Calibration)."""
        return {d: Calibration.from_dict(a["calibration"]) for d, a in (self.meta.get("adapted") or {}).items()}

    @property
    def learned_weight(self) -> float:
        """Weight of the learned part of the user vector against the text prior (1 unless calibrated for zero-shot)."""
        return float(self.meta.get("learned_weight", 1.0))

    def item_matrix(self, domain: str) -> tuple[list[str], torch.Tensor]:
        t = self.items[domain]
        vecs = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(), dtype=np.float32)
        return t.column("item_id").to_pylist(), torch.from_numpy(vecs.reshape(t.num_rows, -1).copy())


def served_domains(meta: dict) -> list[str]:
    """The domains a bundle (its bundle.json) answers in: those its model trained on, then those `crossrec adapt`
    added."""
    return [*meta["domains"], *(d for d in meta.get("adapted") or {} if d not in meta["domains"])]


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle folder (it has bundle.json)."""
    return (Path(path) / "bundle.json").is_file()


def bundle_meta(path: str | Path, field: str | None = None) -> dict:
    """bundle.json of the bundle at `path`; a folder that is no bundle is refused naming `field` (the option or
    config key it came from), e.g. "`init_from`: out/x is not a crossrec bundle (no bundle.json)"."""
    if not is_bundle(path):
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}{path} is not a crossrec bundle (no bundle.json); create one with `crossrec train`")
    return json.loads((Path(path) / "bundle.json").read_text())


@dataclass
class BundleContents:
    """Everything a bundle holds (what `save_bundle` writes)."""

    model: CrossRecModel
    config: TrainConfig
    domains: list[str]  # the model's domain ids, in order
    items: dict[str, tuple[list[str], list[str], np.ndarray]]  # per domain: ids, titles, vectors (n, D)
    metrics: dict
    data_hash: str
    in_dim: int | None = None  # backbone vector size (text items)
    n_items: int | None = None  # item embeddings of an id model / item_ids
    priors: list[Prior] = field(default_factory=list)  # fitted, with their weights (crossrec.priors)
    adapter_dir: Path | None = None  # peft adapter of an end-to-end run
    indexes: dict[str, IvfIndex] = field(default_factory=dict)  # domain -> ANN index of its items (crossrec.index)
    extra: dict = field(default_factory=dict)  # more bundle.json entries


def save_bundle(path: str | Path, contents: BundleContents) -> Path:
    """Writes a bundle with `crossrec.atomic.publishing` (lock, temporary sibling, fsync, atomic swap: a reader
    sees the old bundle or the new one). Each prior writes its own files and bundle.json entry. bundle.json records
    the sha256 of every file and their `content_hash` (`verify_bundle` checks them)."""
    path = Path(path)
    c = contents
    bad = [why for d in c.domains if (why := check_domain(d)) is not None]
    if bad:  # domain names become file names (items/DOMAIN.parquet)
        raise ValueError(f"`domains`: {bad[0]}")
    with publishing(path, replace=True) as tmp:
        (tmp / "items").mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in c.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        for d, (ids, titles, vecs) in c.items.items():
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            col = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])
            pq.write_table(pa.table({"item_id": ids, "title": titles, "vector": col}), tmp / "items" / f"{d}.parquet")
        priors = {p.meta_key: p.save(tmp) for p in c.priors}
        specs = {}
        if c.indexes:
            (tmp / "index").mkdir()
        for d, index in c.indexes.items():  # rows in items/DOMAIN.parquet order
            index.save(tmp / "index" / f"{d}.faiss")
            specs[d] = {
                "kind": "faiss-ivfflat",
                "n": len(index),
                "nlist": index.nlist,
                "nprobe": index.nprobe,
                "file": f"index/{d}.faiss",
            }
        if c.adapter_dir is not None:
            shutil.copytree(c.adapter_dir, tmp / "adapter")
        h = file_sha256(tmp / "model.safetensors")
        meta = {
            "format": BUNDLE_FORMAT,
            "created_by": f"crossrec {crossrec.__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": f"{path.name}-{h[:12]}",
            "config": config_to_dict(c.config),
            "domains": c.domains,
            "in_dim": c.in_dim,
            "n_items": c.n_items,
            "data_hash": c.data_hash,
            "metrics": c.metrics,
            "priors": [p.spec for p in c.priors],
            **priors,
            **({"retrieval": {"index": specs}} if specs else {}),
            **c.extra,
        }
        meta["files"] = _file_hashes(tmp)
        meta["content_hash"] = bundle_content_hash(meta["files"])
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _file_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file `save_bundle` wrote (bundle.json itself excluded)."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "bundle.json"
    }


def bundle_content_hash(files: dict[str, str]) -> str:
    """One sha256 over (path, sha256) of each file: equal for equal bundle contents, wherever they lie."""
    return hashlib.sha256("".join(f"{k}\0{files[k]}\n" for k in sorted(files)).encode()).hexdigest()


def verify_bundle(path: str | Path) -> str:
    """Checks every file recorded in bundle.json against its sha256 and returns the bundle's content hash;
    raises ValueError naming the first file that is missing or changed. `ranker/` is not covered: it is
    written into the bundle later, by its own publish (`crossrec.ranker.save_ranker`)."""
    path = Path(path)
    meta = bundle_meta(path)
    meta_file = path / "bundle.json"
    files = meta.get("files")
    if not isinstance(files, dict) or "content_hash" not in meta:
        raise ValueError(
            f"{meta_file}: no content hash (written before crossrec recorded one); export the bundle again to verify it"
        )
    if bundle_content_hash(files) != meta["content_hash"]:
        raise ValueError(f"{meta_file}: `files` do not match `content_hash` (bundle.json was edited)")
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise ValueError(f"{path}: {rel} is missing (recorded in bundle.json)")
        got = file_sha256(f)
        if got != want:
            raise ValueError(
                f"{path}: {rel} changed since the bundle was written (sha256 {got[:12]}, "
                f"bundle.json records {want[:12]})"
            )
    return meta["content_hash"]


def load_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Loads a bundle; with `verify`, first checks its files against the hashes in bundle.json
    (`verify_bundle`), so a bundle changed under its reader is refused."""
    path = Path(path)
    if verify:
        verify_bundle(path)
    meta = bundle_meta(path)
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(
            f"{path / 'bundle.json'}: bundle format {meta.get('format')!r}, this crossrec reads {BUNDLE_FORMAT}"
        )
    # Bundles written before `text_prior_cross` existed weighed every history domain alike.
    cfg = config_from_dict({"text_prior_cross": 1.0, **meta["config"]})
    model = CrossRecModel(cfg, len(meta["domains"]), in_dim=meta["in_dim"], n_items=meta["n_items"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    catalog = [*meta["domains"], *(d for d in meta.get("adapted") or {} if d not in meta["domains"])]
    items = {
        d: pq.read_table(path / "items" / f"{d}.parquet")
        for d in catalog
        if (path / "items" / f"{d}.parquet").is_file()
    }
    return Bundle(path=path, meta=meta, config=cfg, model=model, domains=list(meta["domains"]), items=items)


# The config keys that size the recommender's weights (fusion's are checked where both runs have side vectors).
SHAPE_KEYS = ("item_encoder", "backbone", "dim", "layers", "heads", "max_len", "adaptor", "n_experts")


def check_init(src: dict, cfg: TrainConfig) -> None:
    """Refuses a warm start (`init_from`) from a bundle whose saved config `src` sizes the model differently from
    `cfg`, in one line naming the key and the value to set. The driver calls it before any work; the workers again
    when loading."""
    for key in SHAPE_KEYS:
        if src[key] != getattr(cfg, key):
            raise ValueError(
                f"`init_from`: the bundle has {key}={src[key]!r}, this run {getattr(cfg, key)!r}; they must match "
                f"(--set {key}={src[key]}, or train without --init)"
            )
    if cfg.item_encoder != "text":
        raise ValueError("`init_from` needs `item_encoder` text: ID embeddings do not transfer across catalogs")
    if src.get("side_dims") and cfg.side_dims:  # both fuse side vectors: the fusion must be the same shape
        for key in ("side_dims", "fusion"):
            if src.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"`init_from`: the bundle has {key}={src.get(key)!r}, this run {getattr(cfg, key)!r}; they "
                    "must match (the same graph/feature_columns and fusion as the bundle, or train without --init)"
                )


def init_from_bundle(
    model: CrossRecModel,
    cfg: TrainConfig,
    domains: list[str],
    path: str | Path,
    item_ids: np.ndarray | None = None,
) -> None:
    """Warm start: `model` (for `domains`, catalog `item_ids` in global order) from a bundle trained on other
    domains (transfer) or an older snapshot of the logs. Domain embeddings are matched by name; a domain the
    bundle never saw starts from the bundle's "unknown" embedding, which is what zero-shot uses, so fine-tuning
    starts exactly where zero-shot stands. Item embeddings (`item_ids`) are matched by item id: an item new to the
    catalog starts at zero, as an item never seen in training; one the catalog dropped is left out."""
    meta = bundle_meta(path, "`init_from`")
    check_init(meta["config"], cfg)
    state = load_file(str(Path(path) / "model.safetensors"))
    old = list(meta["domains"])
    rows = [*domain_ids(old, domains), len(old)]
    for key in ("tower.domain.weight", "tower.next_domain.weight"):
        state[key] = state[key][rows]
    own = model.state_dict()
    if "item_emb.weight" in state:
        if "item_emb.weight" in own and item_ids is not None:
            state["item_emb.weight"] = _item_rows_by_id(
                Path(path), meta, state["item_emb.weight"], own["item_emb.weight"], item_ids
            )
        else:
            del state["item_emb.weight"]  # another catalog: item ids do not carry over, text does
    for key, value in state.items():  # a safety net under check_init: one line, not load_state_dict's list
        if key in own and value.shape != own[key].shape:
            raise ValueError(
                f"`init_from`: the bundle's {key} has shape {tuple(value.shape)}, this run's "
                f"{tuple(own[key].shape)}; train with the bundle's config, or without --init"
            )
    model.load_state_dict(state, strict=False)


def _item_rows_by_id(
    path: Path, meta: dict, src: torch.Tensor, own: torch.Tensor, item_ids: np.ndarray
) -> torch.Tensor:
    """`own`'s item embedding rows (global order of `item_ids`, last row "no id") with the rows of the same items
    in the bundle's `src`. The bundle's global order is its training catalog's (crossrec.splits: domains sorted,
    then item id), which items/DOMAIN.parquet keeps (less adapted domains); a bundle whose files do not add up to it keeps `own`."""
    adapted = meta.get("adapted") or {}  # domains `crossrec adapt` added: not in the training catalog
    doms = sorted(p.stem for p in (path / "items").glob("*.parquet") if p.stem not in adapted)
    old_ids = [
        i for d in doms for i in pq.read_table(path / "items" / f"{d}.parquet", columns=["item_id"])[0].to_pylist()
    ]
    if len(old_ids) != src.shape[0] - 1:
        return own
    pos = {iid: k for k, iid in enumerate(old_ids)}
    out = own.clone()
    pairs = [(j, pos[iid]) for j, iid in enumerate(item_ids.tolist()) if iid in pos]
    if pairs:
        new_rows, old_rows = (torch.tensor(x) for x in zip(*pairs))
        out[new_rows] = src[old_rows]
    return out
