"""Typed training configuration: YAML files and `--set key=value` overrides load into these dataclasses.

What is saved with a model (`TrainConfig`, in the bundle) is kept apart from where and how a run executes
(`RunSettings`: workers, GPUs, storage, Ray address), as peft keeps `LoraRuntimeConfig` apart.
Unknown keys are errors that list the accepted ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "LoraConfig",
    "DeepSpeedConfig",
    "RankerConfig",
    "RetrievalConfig",
    "GraphConfig",
    "BehaviourConfig",
    "TrainConfig",
    "RunSettings",
    "NAMED_CONFIGS",
    "DEFAULT_CONFIG",
    "load_config",
    "default_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "from_dict",
    "set_dotted",
    "check_types",
    "config_help",
    "DERIVED",
    "check_settable",
]

MODES = ("cached", "end-to-end")
ADAPTORS = ("moe", "mlp", "linear")
ITEM_ENCODERS = ("text", "id")
STRATEGIES = ("ddp", "deepspeed")
FUSIONS = ("concat", "gate", "attention")
RATING_MODES = ("off", "feature")
# TrainConfig fields that training computes and saves in the bundle: not settable (--set, --config, sweep files).
DERIVED = ("side_dims",)
DEFAULT_PRIORS = ("popularity", "transition")


def _doc(default: Any, doc: str):
    """A config field with its one-line doc in the field's metadata (`crossrec train --help-config` lists it)."""
    return field(default=default, metadata={"doc": doc})


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class LoraConfig:
    """LoRA adapters on the backbone (end-to-end mode)."""

    enabled: bool = _doc(True, "False: full fine-tuning of the backbone")
    rank: int = _doc(8, "adapter rank r")
    alpha: float = _doc(16.0, "scaling numerator (scale = alpha / rank)")
    dropout: float = _doc(0.05, "dropout on the adapter input")
    target_modules: list[str] | None = _doc(
        None, "module names to adapt; null: the backbone family's attention projections (backbones.py)"
    )
    per_domain: bool = _doc(False, "one adapter per domain on a shared backbone (an item uses its domain's)")

    def __post_init__(self):
        check_types(self, "lora.")
        if self.per_domain and not self.enabled:
            raise ValueError("`lora.per_domain` needs `lora.enabled: true` (a full fine-tune has one backbone)")
        _check_positive("lora.rank", self.rank)
        _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {self.dropout!r}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings (strategy `deepspeed`)."""

    zero_stage: int = _doc(2, "ZeRO stage: 1, 2 or 3")
    bf16: bool = _doc(True, "bfloat16 where the device supports it")
    grad_accum: int = _doc(1, "gradient accumulation steps")
    offload_optimizer: bool = _doc(False, "ZeRO-Offload: optimizer state in CPU memory")
    offload_params: bool = _doc(False, "parameters offloaded to CPU memory (stage 3 only)")
    grad_clip: float = _doc(1.0, "gradient norm clipping")

    def __post_init__(self):
        check_types(self, "deepspeed.")
        _check_choice("deepspeed.zero_stage", self.zero_stage, (1, 2, 3))
        _check_positive("deepspeed.grad_accum", self.grad_accum)
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("`deepspeed.offload_params` needs `deepspeed.zero_stage` 3")


@dataclass
class RankerConfig:
    """The second-stage ranker over retrieval's top-N (see crossrec.ranker), trained after the retriever."""

    enabled: bool = _doc(False, "train a ranker and store it in the bundle (ranker/)")
    top_n: int = _doc(100, "candidates from retrieval that the ranker re-orders")
    epochs: int = _doc(20, "ranker training epochs")
    lr: float = _doc(3e-3, "ranker learning rate")
    hidden: int = _doc(64, "MLP width")
    batch_size: int = _doc(128, "candidate lists per step")
    weight_decay: float = _doc(1e-4, "ranker AdamW weight decay")
    dropout: float = _doc(0.1, "ranker MLP dropout")
    patience: int = _doc(3, "epochs without holdout NDCG@10 gain before stopping (0: never)")
    valid_fraction: float = _doc(0.2, "validation users held out for early stopping (the rest train the ranker)")
    graph: bool = _doc(True, "knowledge-graph similarity features (item-attribute tokens + co-interactions)")

    def __post_init__(self):
        check_types(self, "ranker.")
        for name in ("top_n", "epochs", "lr", "hidden", "batch_size"):
            _check_positive(f"ranker.{name}", getattr(self, name))
        for name in ("weight_decay", "patience"):
            _check_positive(f"ranker.{name}", getattr(self, name), allow_zero=True)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`ranker.dropout` must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"`ranker.valid_fraction` must be in (0, 1), got {self.valid_fraction!r}")


@dataclass
class GraphConfig:
    """Knowledge-graph item vectors (graph.py) fused with the text vector in the item encoder."""

    enabled: bool = _doc(False, "LightGCN graph vectors as an item-encoder input")
    layers: int = _doc(2, "propagation layers K")
    co_interaction: bool = _doc(True, "item-item edges between consecutive TRAINING interactions of a user")
    columns: list[str] | None = _doc(None, "categorical item columns; null: every string column but id/domain/title")

    def __post_init__(self):
        check_types(self, "graph.")
        _check_positive("graph.layers", self.layers)
        if isinstance(self.columns, str):
            self.columns = [c for c in self.columns.split(",") if c]


@dataclass
class RetrievalConfig:
    """How retrieval finds a domain's top items at request time (crossrec.index); evaluation scores every item."""

    index: str = _doc(
        "auto",
        "auto: an ANN index for domains of at least `ann_min_items` items, exact scan below; exact: never; ann: for "
        "every domain",
    )
    # Exact scan of 40k items took 52 ms p50 on the loaded 2-core machine against 0.26 ms for the index (docs/ANN.md);
    # below this size exact answers stay identical to what evaluation scores.
    ann_min_items: int = _doc(50_000, "auto: catalog size from which a domain gets an ANN index (built at export)")
    nprobe: int = _doc(
        16, "ANN: coarse cells a query visits, when export cannot tune it on validation users (more: higher recall)"
    )
    candidates: int = _doc(200, "ANN: the index's top items per request, rescored exactly with the priors")

    def __post_init__(self):
        check_types(self, "retrieval.")
        _check_choice("retrieval.index", self.index, ("auto", "exact", "ann"))
        for name in ("ann_min_items", "nprobe", "candidates"):
            _check_positive(f"retrieval.{name}", getattr(self, name))

    def builds_index(self, n_items: int) -> bool:
        """Whether a domain of n_items gets an ANN index at export."""
        return self.index == "ann" or (self.index == "auto" and n_items >= self.ann_min_items)


@dataclass
class BehaviourConfig:
    """How the user tower reads what a user did with each history item beyond the item itself (the interactions'
    optional `rating`). Measured on MovieLens-100K, the one rated data set at hand (docs/RESULTS.md, "Ratings").
    Event types (`event`) are kept in prepared data but read by no model: no data set here has them to measure on."""

    rating: str = _doc(
        "off",
        "off: ratings ignored; feature: a learned embedding of the rounded rating (0-10, or 'unknown') added to "
        "each history position of the user tower (needs a `rating` column; requests without one read 'unknown')",
    )
    # Requests and datasets without a rating still read the 'unknown' row: training hides a share of the ratings
    # so that row is trained and a history without ratings is not out of distribution.
    rating_dropout: float = _doc(0.1, "feature: chance a history rating is read as 'unknown' in a training batch")

    def __post_init__(self):
        check_types(self, "behaviour.")
        _check_choice("behaviour.rating", self.rating, RATING_MODES)
        if not 0 <= self.rating_dropout < 1:
            raise ValueError(f"`behaviour.rating_dropout` must be in [0, 1), got {self.rating_dropout!r}")


@dataclass
class TrainConfig:
    """Everything that defines a trained model; saved in the bundle."""

    backbone: str = _doc("minilm", "registry name (minilm, smollm2-135m) or a local Hugging Face model directory")
    mode: str = _doc("cached", "cached: frozen backbone, precomputed vectors; end-to-end: backbone trained too")
    item_encoder: str = _doc("text", "text: adaptor over backbone vectors; id: an embedding per item (SASRec)")
    text_template: str = _doc("", "item text; '' = title plus any attributes/categories/brand (see text.py)")
    max_tokens: int = _doc(64, "item text truncation, in backbone tokens")
    adaptor: str = _doc("moe", "moe (UniSRec whitening + mixture of experts), mlp, linear")
    n_experts: int = _doc(4, "experts of the moe adaptor")
    dim: int = _doc(64, "item / user vector size")
    layers: int = _doc(2, "user-tower transformer layers")
    heads: int = _doc(2, "attention heads")
    max_len: int = _doc(30, "history items the user tower reads")
    dropout: float = _doc(0.2, "dropout in the adaptor and user tower")
    temperature: float = _doc(0.2, "initial softmax temperature tau of the learned score")
    learn_temperature: bool = _doc(True, "tau is a trained parameter (clamped to [0.01, 1])")
    item_ids: bool = _doc(
        False, "text items: also a learned embedding per item seen in training (new items: text only)"
    )
    text_prior: bool = _doc(True, "text items: add beta * (textknn's cosine) to the learned score (see model.py)")
    text_prior_weight: float = _doc(10.0, "initial beta (trained)")
    # Recency decay of the history mean in the text prior, and the weight of history items from other domains
    # than the target's. None: chosen before training on the validation split from textknn's grid
    # (crossrec.training.resolve_text_prior), so the prior is the dataset's best textknn; bundles store the values.
    text_prior_decay: float | None = _doc(
        None, "recency decay of the text prior's history mean; null: chosen on validation"
    )
    text_prior_cross: float | None = _doc(
        None, "weight of other domains' history items in the text prior; null: chosen on validation"
    )
    priors: list[str] = field(
        default_factory=lambda: list(DEFAULT_PRIORS),
        metadata={
            "doc": "terms added to retrieval scores, each weighted per domain on validation at training end, 0 "
            "included, in this order (crossrec.priors): popularity, transition, or module:Class; [] for none"
        },
    )
    n_negatives: int = _doc(128, "sampled negatives per domain and batch, on top of in-batch ones")
    domain_dropout: float = _doc(0.1, "chance to replace a domain id by 'unknown': trains the zero-shot path")
    epochs: int = _doc(8, "training epochs (early stopping may end sooner)")
    max_steps: int = _doc(0, "> 0 stops after this many optimizer steps (overrides epochs)")
    lr: float = _doc(1e-3, "learning rate of the adaptor and user tower (AdamW)")
    backbone_lr: float = _doc(1e-4, "end-to-end: learning rate of the backbone's trainable weights")
    # End-to-end: at most this many distinct items per step and worker go through the backbone with gradients
    # (targets first, then history items); the rest (sampled negatives, overflow) are encoded without gradients.
    # Bounds the backbone's activation memory (see crossrec.finetune.memory_estimate); 0: every item with gradients.
    backbone_grad_items: int = _doc(
        32,
        "end-to-end: items per step and worker with gradients through the backbone "
        "(targets, then history); the rest without; bounds memory; 0: all",
    )
    # End-to-end: the items of a step encoded without gradients (history overflow, sampled negatives) take their
    # vector from a bank of recent backbone vectors when it is at most this many steps old, as a memory bank of
    # negatives does (MoCo, He et al. 2020; XBM, Wang et al. 2020: the drift of slowly trained features is small);
    # the bank is refilled by every step's gradient items and by each epoch's validation, which embeds the whole
    # catalog anyway. Re-encoding them every step was ~95% of a default step's backbone work (docs/RESULTS.md
    # "End-to-end speed"). 0: every step re-encodes them (exact, slow).
    backbone_bank_steps: int = _doc(
        50,
        "end-to-end: items without gradients reuse their backbone vector from at most this many steps ago "
        "(a memory bank refreshed by each validation); 0: re-encode every step",
    )
    weight_decay: float = _doc(0.01, "AdamW weight decay")
    batch_size: int = _doc(256, "sequences per optimizer step, over all workers")
    seed: int = _doc(0, "seed of initialisation, batch order, negatives and dropout")
    train_domains: list[str] | None = _doc(None, "the domains to train on; null: all domains of the dataset")
    init_from: str | None = _doc(None, "a bundle to start from (transfer: pretrained on other domains)")
    finetune: str = _doc("all", "with init_from: 'all' weights, or 'adaptor' only (user tower frozen)")
    min_per_domain: int = _doc(3, "split protocol: interactions a (user, domain) needs to give targets")
    valid_max_targets: int = _doc(3000, "validation targets per domain scored each epoch (0: all)")
    patience: int = _doc(2, "epochs without validation gain before stopping (0: never)")
    strategy: str = _doc("ddp", "ddp or deepspeed")
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"doc": "LoRA adapters on the backbone (end-to-end mode): the lora.* keys"}
    )
    deepspeed: DeepSpeedConfig = field(
        default_factory=DeepSpeedConfig, metadata={"doc": "DeepSpeed ZeRO (strategy deepspeed): the deepspeed.* keys"}
    )
    retrieval: RetrievalConfig = field(
        default_factory=RetrievalConfig,
        metadata={"doc": "approximate (ANN) or exact retrieval at request time: the retrieval.* keys"},
    )
    graph: GraphConfig = field(
        default_factory=GraphConfig, metadata={"doc": "knowledge-graph item vectors fused with text: the graph.* keys"}
    )
    feature_columns: list[str] | None = _doc(None, "list<float32> item columns fused with text (e.g. image vectors)")
    fusion: str = _doc("concat", "how text, graph and feature vectors combine: concat, gate, attention")
    # Chance that an item's side vectors are hidden in a training batch: trains the text-only path that new
    # items, items without graph edges and zero-shot catalogs take (like domain_dropout for domain ids). Off by
    # default: 0.1 cost food-kitchen a third of the ranker's gain in-domain (docs/RESULTS.md, "Reference numbers").
    side_dropout: float = _doc(
        0.0, "chance an item's graph/feature vectors are hidden in a training batch (trains the text-only path)"
    )
    side_dims: list[int] | None = _doc(
        None, "set by training: sizes of the graph/feature blocks after the text vector (not settable)"
    )
    ranker: RankerConfig = field(
        default_factory=RankerConfig,
        metadata={"doc": "the second-stage ranker over retrieval's top-N: the ranker.* keys"},
    )
    # A bundle is only evaluated under the protocol it was trained under (it has seen the other protocol's targets).
    protocol: str = _doc(
        "leave-one-out",
        "split protocol: leave-one-out per (user, domain), or cold-user (a seeded "
        "share of multi-domain users held out; see crossrec.splits)",
    )
    cold_fraction: float = _doc(0.2, "cold-user: share of the multi-domain users held out (half validation, half test)")
    cold_seed: int = _doc(0, "cold-user: seed of the hash that picks the held-out users")
    # DESIGN.md "Loss"; CL4SRec: Xie et al., ICDE 2022.
    align_weight: float = _doc(
        0.0,
        "domain alignment: weight of an RBF-kernel MMD between the learned user vectors "
        "of each pair of target domains in a batch (0: off)",
    )
    ssl_weight: float = _doc(
        0.0,
        "self-supervised sequence objective (CL4SRec): weight of an InfoNCE between two "
        "masked and cropped views of each training window (0: off)",
    )
    ssl_mask: float = _doc(0.3, "self-supervised views: share of history items masked out")
    behaviour: BehaviourConfig = field(
        default_factory=BehaviourConfig,
        metadata={"doc": "what the user did with each history item (ratings): the behaviour.* keys"},
    )

    def __post_init__(self):
        if not isinstance(self.lora, LoraConfig):
            self.lora = from_dict(LoraConfig, self.lora, "lora")
        if not isinstance(self.deepspeed, DeepSpeedConfig):
            self.deepspeed = from_dict(DeepSpeedConfig, self.deepspeed, "deepspeed")
        if not isinstance(self.ranker, RankerConfig):
            self.ranker = from_dict(RankerConfig, self.ranker, "ranker")
        if not isinstance(self.graph, GraphConfig):
            self.graph = from_dict(GraphConfig, self.graph, "graph")
        if not isinstance(self.retrieval, RetrievalConfig):
            self.retrieval = from_dict(RetrievalConfig, self.retrieval, "retrieval")
        if not isinstance(self.behaviour, BehaviourConfig):
            self.behaviour = from_dict(BehaviourConfig, self.behaviour, "behaviour")
        check_types(self)
        _check_choice("fusion", self.fusion, FUSIONS)
        if isinstance(self.feature_columns, str):
            self.feature_columns = [c for c in self.feature_columns.split(",") if c]
        if isinstance(self.priors, str):
            self.priors = [c for c in self.priors.split(",") if c]
        _check_priors(self.priors)
        _check_choice("mode", self.mode, MODES)
        _check_choice("item_encoder", self.item_encoder, ITEM_ENCODERS)
        if (self.graph.enabled or self.feature_columns) and (self.item_encoder != "text" or self.mode != "cached"):
            raise ValueError(
                "`graph.enabled` and `feature_columns` fuse side vectors with cached text vectors: "
                "they need `item_encoder` text and `mode` cached"
            )
        _check_choice("adaptor", self.adaptor, ADAPTORS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("finetune", self.finetune, ("all", "adaptor"))
        if self.finetune == "adaptor" and self.item_encoder != "text":
            raise ValueError("`finetune` adaptor needs `item_encoder` text (an id model has no adaptor)")
        for name in (
            "dim",
            "layers",
            "heads",
            "max_len",
            "n_experts",
            "epochs",
            "batch_size",
            "max_tokens",
            "lr",
            "backbone_lr",
            "temperature",
            "text_prior_weight",
        ):
            _check_positive(name, getattr(self, name))
        for name in (
            "max_steps",
            "n_negatives",
            "weight_decay",
            "valid_max_targets",
            "patience",
            "backbone_grad_items",
            "backbone_bank_steps",
        ):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.dim % self.heads:
            raise ValueError(f"`dim` ({self.dim}) must be a multiple of `heads` ({self.heads})")
        if self.text_prior_cross is not None and not 0 <= self.text_prior_cross <= 1:
            raise ValueError(
                f"`text_prior_cross` must be in [0, 1] (or null: chosen on validation), got {self.text_prior_cross!r}"
            )
        if self.text_prior_decay is not None and not 0 < self.text_prior_decay <= 1:
            raise ValueError(
                f"`text_prior_decay` must be in (0, 1] (or null: chosen on validation), got {self.text_prior_decay!r}"
            )
        for name in ("dropout", "domain_dropout", "side_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}")
        if self.min_per_domain < 2:
            raise ValueError(f"`min_per_domain` must be >= 2, got {self.min_per_domain}")
        if self.item_encoder == "id" and self.mode != "cached":
            raise ValueError("`item_encoder` id (SASRec) has no backbone: use `mode` cached")
        if isinstance(self.train_domains, str):
            self.train_domains = [d for d in self.train_domains.split(",") if d]
        _check_choice("protocol", self.protocol, ("leave-one-out", "cold-user"))
        if not 0 < self.cold_fraction < 1:
            raise ValueError(f"`cold_fraction` must be in (0, 1), got {self.cold_fraction!r}")
        for name in ("align_weight", "ssl_weight"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if not 0 <= self.ssl_mask < 1:
            raise ValueError(f"`ssl_mask` must be in [0, 1), got {self.ssl_mask!r}")


@dataclass
class RunSettings:
    """Where and how a run executes; not saved with the model."""

    workers: int = 2  # Ray Train workers (DDP ranks)
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    address: str | None = None  # Ray address; None: a local in-process Ray
    storage_path: str | None = None  # checkpoints and results (default: BUNDLE/../.runs)
    name: str | None = None  # run name inside storage_path (same name resumes)
    max_failures: int = 2  # worker-group restarts from the last checkpoint


# Built-in configs for `crossrec train --config NAME`: data, like a YAML file's keys over TrainConfig's defaults.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # The retrieve-then-rank pipeline measured best on both vendored datasets (docs/RESULTS.md "Reference numbers"):
    # cached text vectors fused (attention) with knowledge-graph vectors, then the ranker over retrieval's top-N.
    # configs/recommended.yaml is its documented copy (a test keeps the two equal).
    "recommended": {
        "graph": {"enabled": True},
        "fusion": "attention",
        "epochs": 14,
        "patience": 3,
        "ranker": {"enabled": True},
    },
    # TrainConfig's own defaults: cached text vectors only, no graph, no ranker.
    "basic": {},
}
# What `crossrec train` trains without --config (default_config).
DEFAULT_CONFIG = "recommended"
# The default where `recommended` does not apply (end-to-end, id items, a warm start without side vectors):
# `basic` plus the ranker, which re-orders any retriever's top-N (no feature of it needs text vectors) and whose
# epoch 0 keeps retrieval's order. Recommended's 14 epochs / patience 3 were measured for the fused pipeline.
_FALLBACK = {"ranker": {"enabled": True}}


def from_dict(cls, data: Any, where: str = "", kind: str = "config"):
    """`cls(**data)` for a dataclass of config, refusing a non-mapping or an unknown key with the accepted ones.
    `where` is the section's dotted name ("lora", "space.lr"; "" for the top level), `kind` names the file kind
    in the message ("config", "sweep")."""
    if not isinstance(data, dict):
        raise ValueError(f"`{where or kind}` must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown {kind} key `{prefix}{unknown[0]}` (accepted: {', '.join(prefix + n for n in sorted(names))})"
        )
    return cls(**data)


def set_dotted(data: dict, key: str, value: Any) -> None:
    """data[a][b] = value for the dotted key "a.b", making sections as needed (in place)."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"`{key}`: `{p}` is not a section")
    node[parts[-1]] = value


def check_types(obj: Any, prefix: str = "") -> None:
    """Each scalar field of a config dataclass holds a value of its annotated type (`--set dropout=abc` is
    refused naming the key, not a traceback later). Ints are accepted where floats are, and become floats."""
    for f in fields(obj):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = getattr(obj, f.name)
        if value is None:
            if "None" not in kinds:
                raise ValueError(f"`{prefix}{f.name}` must be set, got null")
            continue
        base = kinds[0]
        if base == "bool":
            ok = isinstance(value, bool)
            want = "true or false"
        elif base == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif base == "float":
            if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string: accept the number it means
                try:
                    value = float(value)
                except ValueError:
                    pass
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
            if ok:
                setattr(obj, f.name, float(value))
        elif base == "str":
            ok, want = isinstance(value, str), "a string"
        else:  # lists and sections check themselves
            continue
        if not ok:
            raise ValueError(f"`{prefix}{f.name}` must be {want}, got {value!r}")


def config_from_dict(data: dict) -> TrainConfig:
    data = dict(data)
    # Bundles and runs written before `priors` had a switch per prior (both on by default).
    legacy = {k: data.pop(k) for k in ("pop_prior", "co_prior") if k in data}
    if legacy and "priors" not in data:
        data["priors"] = [
            n for k, n in (("pop_prior", "popularity"), ("co_prior", "transition")) if legacy.get(k, True)
        ]
    return from_dict(TrainConfig, data)


def _check_priors(names: Any) -> None:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"`priors` must be a list of prior names, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"`priors`: a prior is listed twice in {names!r}")
    from crossrec.priors import prior_class

    for n in names:
        prior_class(n)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    """YAML scalars (true, null, [a, b], 16); YAML 1.1 reads `1e-3` as a string, so floats are tried too."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` with dotted keys (`lora.rank=16`) applied onto a config mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            set_dotted(out, key.strip(), _parse_value(value.strip()))
        except ValueError as e:
            raise ValueError(f"--set {e}") from None
    return out


def check_settable(data: dict, where: str = "") -> None:
    """Refuses the derived keys (DERIVED) in what a user wrote: training sets them."""
    for key in DERIVED:
        if key in data:
            raise ValueError(f"`{where}{key}` is set by training (derived from the data), not a setting")


def config_help(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line doc) of every settable TrainConfig key, sections expanded, in field order:
    read from the fields' metadata, so the docs live beside the fields."""
    cls = cls or TrainConfig
    out = []
    for f in fields(cls):
        if not prefix and f.name in DERIVED:
            continue
        if dataclasses.is_dataclass(f.type) or (
            f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
        ):
            out += config_help(f.default_factory, f"{prefix}{f.name}.")
            continue
        factory: Any = f.default_factory  # a callable whenever there is no plain default
        default = f.default if f.default is not dataclasses.MISSING else factory()
        out.append(
            (
                prefix + f.name,
                "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default),
                f.metadata.get("doc", ""),
            )
        )
    return out


def _config_data(source: str | Path | None) -> dict:
    """The mapping of a named config (NAMED_CONFIGS), a YAML file, or {} (None: TrainConfig's defaults)."""
    if source is None:
        return {}
    if str(source) in NAMED_CONFIGS:
        return copy.deepcopy(NAMED_CONFIGS[str(source)])
    p = Path(source)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file (built-in configs: {', '.join(sorted(NAMED_CONFIGS))})")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config keys")
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A named config (`recommended`, `basic`: NAMED_CONFIGS), a YAML file (data only), or None (TrainConfig's
    defaults, i.e. `basic`), plus `--set` overrides, validated; derived keys are refused."""
    return _with_overrides(_config_data(source), overrides)


def _with_overrides(data: dict, overrides: list[str] | None) -> TrainConfig:
    data = apply_overrides(data, overrides or [])
    check_settable(data)
    return config_from_dict(data)


def default_config(
    overrides: list[str] | None = None, init_config: dict | None = None
) -> tuple[TrainConfig, str | None]:
    """What `crossrec train` trains without --config: DEFAULT_CONFIG (`recommended`) plus `overrides`, where it
    applies. Its graph + attention fusion fuses side vectors with cached text vectors, so when the overrides pick
    `mode` end-to-end or `item_encoder` id, or `init_from` a bundle (`init_config`: its saved config) trained
    without side vectors (its item encoder has no fusion to start from), the default is `basic` plus the ranker
    instead; overrides still apply on top (setting `graph.enabled` there keeps the usual error).
    Returns (config, None) or (config, one line saying which default was used and why)."""
    data = apply_overrides(copy.deepcopy(NAMED_CONFIGS[DEFAULT_CONFIG]), overrides or [])
    why = []
    if data.get("mode", "cached") != "cached":
        why.append(f"`mode` {data['mode']}")
    if data.get("item_encoder", "text") != "text":
        why.append(f"`item_encoder` {data['item_encoder']}")
    if init_config is not None and not init_config.get("side_dims"):
        why.append(f"`init_from` {data.get('init_from')} (a bundle without graph/feature vectors)")
    if not why:
        return _with_overrides(data, None), None
    note = (
        f"default config: `{DEFAULT_CONFIG}` (graph + attention fusion over cached text vectors) does not apply to "
        f"{' and '.join(why)}: training `basic` + the ranker (ranker.enabled=true); --config NAME|FILE chooses"
    )
    return _with_overrides(copy.deepcopy(_FALLBACK), overrides), note
