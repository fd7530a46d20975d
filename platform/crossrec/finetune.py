"""End-to-end fine-tuning of the backbone together with the recommender: LoRA (peft) or full fine-tuning.

    item index ──► catalog tokens (pre-tokenized once) ──► backbone (+ LoRA) ──► pooled ──► CrossRecModel

`EndToEndModel` is the module a strategy trains: its forward is `CrossRecModel.forward` with `item_x` = global item
indices, which it turns into backbone vectors with gradients. Adapters are saved in peft's own format
(`adapter_config.json` + `adapter_model.safetensors`), loadable by `peft.PeftModel.from_pretrained` without
crossrec; a full fine-tune (`lora.enabled: false`) saves a whole Hugging Face model directory instead.
`load_adapted_backbone` merges an adapter into its base so serving runs a plain model. Plain PyTorch; no Ray.

Per-domain adapters (`lora.per_domain`): one LoRA adapter per domain on one shared base, named after the domain;
an item's text goes through its domain's adapter. Saved as peft saves several adapters: one peft folder per
domain (`adapter/<domain>/`), each loadable on its own with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from crossrec.backbones import Backbone, load_backbone, lora_target_modules
from crossrec.config import LoraConfig, TrainConfig
from crossrec.model import CrossRecModel

__all__ = [
    "build_end_to_end",
    "apply_lora",
    "ItemTextEncoder",
    "EndToEndModel",
    "trainable_backbone_state",
    "load_backbone_state",
    "save_adapter",
    "load_adapted_backbone",
    "merge_adapter",
    "write_merged",
    "is_adapter_dir",
    "domain_adapters",
    "adapter_names",
    "activate_adapter",
    "init_backbone_from_bundle",
    "grad_rows",
    "memory_estimate",
    "backbone_size",
    "check_memory",
]

ADAPTER_CONFIG = "adapter_config.json"  # peft's file name: marks a LoRA adapter folder


def _module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def apply_lora(backbone: Backbone, lora: LoraConfig, domains: Sequence[str] = ()) -> Backbone:
    """Makes the backbone trainable in place: peft LoRA on `lora.target_modules` (default: the family's
    attention projections), one adapter per domain of `domains` with `lora.per_domain`, or every weight when
    `lora.enabled` is false. Returns the same Backbone."""
    if lora.per_domain:
        if not lora.enabled:
            raise ValueError("`lora.per_domain` needs `lora.enabled: true` (a full fine-tune has one backbone)")
        bad = [d for d in domains if not d or "." in d or d == "default"]
        if not domains or bad:
            raise ValueError(
                f"`lora.per_domain` names one adapter per domain; domain names must be non-empty, "
                f"without '.', and not 'default' (got {list(domains)!r})"
            )
    if not lora.enabled:
        for p in backbone.model.parameters():
            p.requires_grad_(True)
        return backbone
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules) if lora.target_modules else lora_target_modules(backbone.spec.family)
    names = _module_names(backbone.model)
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"`lora.target_modules`: {', '.join(missing)} not in backbone {backbone.spec.name!r} "
            f"(its linear layers: {', '.join(linear)})"
        )
    config = PeftLoraConfig(
        r=int(lora.rank),
        lora_alpha=float(lora.alpha),  # type: ignore[arg-type]  # peft's stub says int; it scales by a float
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        bias="none",
    )
    if not lora.per_domain:
        with _quiet_peft():
            backbone.model = get_peft_model(backbone.model, config)
        return backbone
    with _quiet_peft():
        backbone.model = get_peft_model(backbone.model, config, adapter_name=domains[0])
    for d in domains[1:]:
        backbone.model.add_adapter(d, config)
    backbone.model.set_requires_grad(list(domains), True)  # add_adapter leaves only the active adapter trainable
    return backbone


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers 5 for the deprecated `is_gradient_checkpointing` when it wraps a model: a
    FutureWarning in every training run's and Serve replica's output about code that is not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def adapter_names(backbone: Backbone) -> list[str]:
    """The per-domain adapters of a backbone (empty for one adapter, a full fine-tune or a frozen backbone)."""
    from peft import PeftModel

    model = backbone.model
    if not isinstance(model, PeftModel) or list(model.peft_config) == ["default"]:
        return []
    return list(model.peft_config)


def activate_adapter(backbone: Backbone, name: str) -> None:
    """Routes the backbone's forward through adapter `name`. peft's own `set_adapter` also freezes every other
    adapter (requires_grad), which DDP and DeepSpeed registered as trainable when they wrapped the model: here only
    the active adapter changes, on every LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in backbone.model.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = [name]


class ItemTextEncoder(nn.Module):
    """Global item indices -> (N, D) pooled backbone vectors with gradients. The catalog is tokenized once
    (truncated to max_tokens); a batch is cut to its own longest text. Tokens are plain attributes, not
    buffers: nothing for DDP to broadcast or for checkpoints to store."""

    def __init__(
        self, backbone: Backbone, texts: Sequence[str], max_tokens: int, item_adapter: Sequence[str] | None = None
    ):
        """item_adapter: with per-domain adapters, the adapter (domain) of each text."""
        super().__init__()
        self.backbone = backbone
        tok = backbone.tokenize(texts, max_tokens)  # right-padded (N, L)
        self.input_ids, self.attention_mask = tok["input_ids"], tok["attention_mask"]
        self.lengths = self.attention_mask.sum(1)  # (N,)
        self.adapters = adapter_names(backbone)
        self.item_adapter = None
        if self.adapters:
            if item_adapter is None or len(item_adapter) != len(texts):
                raise ValueError("per-domain adapters need the domain of every catalog text (item_adapter)")
            code = {a: k for k, a in enumerate(self.adapters)}
            unknown = sorted(set(item_adapter) - set(code))
            if unknown:
                raise ValueError(f"no adapter for domain(s) {unknown} (adapters: {self.adapters})")
            self.item_adapter = torch.tensor([code[a] for a in item_adapter], dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def _encode(self, idx: torch.Tensor) -> torch.Tensor:
        length = int(self.lengths[idx].max())
        device = self.backbone.device
        ids = self.input_ids[idx, :length].to(device)
        mask = self.attention_mask[idx, :length].to(device)
        return self.backbone(ids, mask)  # (N, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        if self.item_adapter is None:
            return self._encode(idx)
        # Every adapter runs on every call, in one order: ZeRO-3 gathers a layer's shards collectively at each
        # forward, so all ranks must run the same forwards whatever domains their batches hold. An adapter
        # without items here encodes one item at weight zero, which also gives its weights the exact zero
        # gradient DDP and ZeRO expect from every trainable weight.
        codes = self.item_adapter[idx]
        parts: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        idle: torch.Tensor | float = 0.0
        for code, name in enumerate(self.adapters):
            at = torch.nonzero(codes == code).squeeze(1)
            activate_adapter(self.backbone, name)
            if len(at):
                parts.append(self._encode(idx[at]))
                rows.append(at)
            else:
                idle = idle + 0.0 * self._encode(idx[:1]).sum()
        return torch.cat(parts)[torch.argsort(torch.cat(rows))] + idle  # back to the order of idx

    @torch.inference_mode()
    def embed(self, idx: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(N, D) float32 CPU vectors, batched by similar length; the train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            perm = torch.argsort(self.lengths[idx], descending=True, stable=True)  # positions in idx
            out = torch.empty(len(idx), self.dim)
            for s in range(0, len(perm), batch_size):
                rows = perm[s : s + batch_size]
                out[rows] = self(idx[rows]).float().cpu()
            return out
        finally:
            self.train(was_training)


class EndToEndModel(nn.Module):
    """Backbone encoder + recommender trained as one module (so DDP / DeepSpeed see every parameter).

    grad_items > 0 bounds the backbone's activation memory: of the step's distinct items, the targets, then the
    history items, up to `grad_items` of them, go through the backbone with gradients; the others (sampled
    negatives, overflow) without gradients, whose activations are freed layer by layer. Their vectors still enter
    the loss (as fixed vectors this step), like the cached negatives of a memory bank.

    bank_steps > 0 makes that a memory bank: an item without gradients whose vector was computed at most
    `bank_steps` steps ago (by a gradient forward, a no-gradient forward, or `refresh_bank` from validation's
    catalog embedding) reuses it instead of running the backbone again."""

    def __init__(
        self,
        recommender: CrossRecModel,
        encoder: ItemTextEncoder,
        grad_items: int = 0,
        max_items: int = 0,
        bank_steps: int = 0,
    ):
        """max_items > 0: every step runs the forwards of that many items without gradients, whatever its
        items (ZeRO-3 gathers each layer's shards collectively: all ranks must run the same forwards)."""
        super().__init__()
        self.recommender = recommender
        self.encoder = encoder
        self.grad_items = grad_items
        self.max_items = max_items
        self.bank_steps = bank_steps
        # Plain attributes, not buffers: a rank's own cache, nothing for DDP to broadcast or checkpoints to store.
        self.bank: torch.Tensor | None = None  # (N, D) float32 backbone vectors
        self.bank_step = torch.full((len(encoder.lengths),), -(1 << 40), dtype=torch.long)  # step each was computed
        self.steps = 0  # training forwards so far (the bank's clock)
        self.tokens = 0  # backbone tokens the training forwards encoded (a throughput count)

    def forward(self, item_x, **inputs) -> torch.Tensor:
        """`CrossRecModel.forward` with item_x = (U,) global item indices, or (indices, id rows) with item_ids."""
        idx, ids = item_x if isinstance(item_x, tuple) else (item_x, None)
        if self.grad_items and self.training and torch.is_grad_enabled():
            vecs = self._encode_bounded(idx, inputs)
            self.steps += 1
        else:
            vecs = self.encoder(idx).float()  # (U, D): the recommender runs in float32 (autocast may lower it)
            self.tokens += int(self.encoder.lengths[idx.cpu()].sum()) if self.training else 0
        return self.recommender(item_x=vecs if ids is None else (vecs, ids), **inputs)

    def refresh_bank(self, vectors: torch.Tensor) -> None:
        """Every item's bank vector from (N, D) vectors under the current weights (validation's embedding)."""
        if self.bank_steps:
            self.bank = vectors.detach().float().clone()
            self.bank_step.fill_(self.steps)

    def _remember(self, idx: torch.Tensor, vecs: torch.Tensor) -> None:
        if not self.bank_steps:
            return
        if self.bank is None:
            self.bank = torch.zeros(len(self.bank_step), vecs.shape[1])
        self.bank[idx] = vecs.detach().float().cpu()
        self.bank_step[idx] = self.steps

    def _encode_bounded(self, idx: torch.Tensor, inputs: dict) -> torch.Tensor:
        n = len(idx)
        rows = grad_rows(n, inputs, self.grad_items)  # (n,) positions in idx, gradient rows first
        grad, rest = rows[: self.grad_items], rows[self.grad_items :]
        with_grad = self.encoder(idx[grad]).float()  # (G, D)
        self.tokens += int(self.encoder.lengths[idx[grad].cpu()].sum())
        device = with_grad.device
        out = torch.empty(n, with_grad.shape[1], device=device)
        out[grad.to(device)] = with_grad
        self._remember(idx[grad].cpu(), with_grad)
        if self.bank_steps and len(rest):
            fresh = self.bank_step[idx[rest].cpu()] >= self.steps - self.bank_steps
            out[rest[fresh].to(device)] = self.bank[idx[rest[fresh]].cpu()].to(device)  # type: ignore[index]
            rest = rest[~fresh]
        # Chunks of similar lengths: a chunk is padded to its longest text.
        rest = rest[torch.argsort(self.encoder.lengths[idx[rest].cpu()], descending=True, stable=True)]
        chunks = max(-(-len(rest) // NO_GRAD_CHUNK), -(-max(0, self.max_items - self.grad_items) // NO_GRAD_CHUNK))
        with torch.no_grad():  # in chunks: the peak is one chunk's layer, whatever the step's items
            for c in range(chunks):
                part = rest[c * NO_GRAD_CHUNK : (c + 1) * NO_GRAD_CHUNK]
                if len(part):
                    vecs = self.encoder(idx[part]).float()
                    self.tokens += int(self.encoder.lengths[idx[part].cpu()].sum())
                    out[part.to(device)] = vecs
                    self._remember(idx[part].cpu(), vecs)
                else:  # ZeRO-3 padding: the same forwards on every rank
                    self.encoder(idx[:1])
        return out  # (n, D) in the order of idx; the gradient rows carry the graph


def grad_rows(n: int, inputs: dict, limit: int) -> torch.Tensor:
    """Positions 0..n-1 of a step's distinct items (`loss_inputs`' item_x) ordered by how much a gradient through
    the backbone is worth: the targets (positives), then the history items, then the rest (negatives). Ties keep
    the item order, so the choice is deterministic (a resumed run goes on exactly)."""
    targets = inputs["cand_index"][inputs["labels"]]  # (P,) positions of the targets
    history = inputs["hist_index"][inputs["valid"]]  # positions of the real history items
    order = torch.cat([targets.reshape(-1), history.reshape(-1), torch.arange(n)]).cpu()
    first = torch.full((n,), len(order), dtype=torch.long).scatter_reduce(0, order, torch.arange(len(order)), "amin")
    return torch.argsort(first, stable=True)


# Measured on SmolLM2-135M (30 layers, hidden 576, fp32, LoRA r=8 on q/k/v/o, 1 torch thread; docs/RESULTS.md
# "End-to-end memory"): peak RSS of forward + backward grows by ~2.0 MiB per token with gradients (8, 16, 32 items x 64
# tokens: +0.7, +1.9, +3.9 GiB), i.e. ~121 bytes per token, hidden unit and layer; other backbones scale by hidden size
# x layers. A forward without gradients frees each layer's activations: its peak is one layer's hidden states and MLP
# (~12 x hidden floats per token).
_GRAD_BYTES_PER_TOKEN_UNIT_LAYER = 125.0
NO_GRAD_CHUNK = 256  # items per forward without gradients
_NOGRAD_FLOATS_PER_TOKEN_UNIT = 12
_WORKER_BASE_GB = 1.2  # a Ray Train worker's torch, tokenized catalog, dataset and optimizer state, measured


def memory_estimate(cfg: TrainConfig, hidden: int, layers: int, n_params: int, workers: int = 1) -> dict:
    """GiB one end-to-end worker needs at its peak: the backbone's fp32 weights, the activations of the
    `backbone_grad_items` items x `max_tokens` tokens it keeps for the backward pass (every item of the step when
    that is 0), the forward without gradients over the step's other items, and the worker's fixed part. A rough,
    measured model; used to refuse a run that cannot fit."""
    step_items = _items_per_step(cfg, workers)
    items = min(cfg.backbone_grad_items, step_items) if cfg.backbone_grad_items else step_items
    act = items * cfg.max_tokens * hidden * layers * _GRAD_BYTES_PER_TOKEN_UNIT_LAYER / 2**30
    rest = min(step_items - items, NO_GRAD_CHUNK) * cfg.max_tokens * hidden * _NOGRAD_FLOATS_PER_TOKEN_UNIT * 4 / 2**30
    weights = n_params * 4 / 2**30
    return {
        "weights": weights,
        "activations": act,
        "no_grad": rest,
        "base": _WORKER_BASE_GB,
        "total": weights + act + rest + _WORKER_BASE_GB,
        "grad_items": items,
    }


def backbone_size(path: str | os.PathLike) -> tuple[int, int, int]:
    """(hidden size, layers, parameters) of a Hugging Face model directory, from config.json and the safetensors
    headers: no weights loaded."""
    import json

    from safetensors import safe_open

    conf = json.loads((Path(path) / "config.json").read_text())
    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n += int(torch.Size(st.get_slice(key).get_shape()).numel())
    return int(conf["hidden_size"]), int(conf["num_hidden_layers"]), n


def check_memory(cfg: TrainConfig, backbone_path: str | os.PathLike, workers: int, available_gb: float) -> dict:
    """Refuses an end-to-end run whose `workers` on this machine would need more than `available_gb`, naming the
    setting to lower; returns the estimate (GiB per worker)."""
    est = memory_estimate(cfg, *backbone_size(backbone_path), workers=workers)
    need = workers * est["total"]
    if need > available_gb:
        fit = (
            max(
                0,
                int(
                    est["grad_items"]
                    * (available_gb / workers - est["total"] + est["activations"])
                    / max(est["activations"], 1e-9)
                ),
            )
            if cfg.backbone_grad_items
            else 0
        )
        hint = (
            f"lower `backbone_grad_items` (to about {fit}) or `max_tokens`"
            if cfg.backbone_grad_items and fit
            else "set `backbone_grad_items` (e.g. 16) or lower `max_tokens`"
            if not cfg.backbone_grad_items
            else "lower `max_tokens` or use fewer --workers"
        )
        raise ValueError(
            f"end-to-end training needs about {need:.1f} GiB ({workers} worker(s) x {est['total']:.1f}: "
            f"backbone {est['weights']:.1f}, activations of {est['grad_items']} items x "
            f"{cfg.max_tokens} tokens {est['activations']:.1f}, the other items without gradients "
            f"{est['no_grad']:.1f}, worker {est['base']:.1f}), "
            f"{available_gb:.1f} GiB are available: {hint}"
        )
    return est


def _items_per_step(cfg: TrainConfig, workers: int, domains: int = 2) -> int:
    """Upper bound of the distinct items a worker's step encodes: its sequences' histories and targets, and the
    sampled negatives of each domain."""
    return max(1, cfg.batch_size // workers) * (cfg.max_len + 1) + domains * cfg.n_negatives


def trainable_backbone_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone weights that training changes (LoRA matrices, or all weights for a full fine-tune)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad}


def load_backbone_state(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_backbone_state`: every trainable weight must be in `state`."""
    own = {n for n, p in backbone.named_parameters() if p.requires_grad}
    missing, extra = own - set(state), set(state) - own
    if missing or extra:
        raise ValueError(
            f"backbone checkpoint does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]} (different lora settings?)"
        )
    backbone.load_state_dict(state, strict=False)


def save_adapter(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """peft format (LoRA; per-domain adapters in `folder/<domain>/`) or a full Hugging Face model directory
    (full fine-tune) at `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder)  # type: ignore[operator]  # PeftModel: adapter_config.json + adapter_model.safetensors
    if not is_adapter_dir(folder) and not domain_adapters(folder):
        backbone.tokenizer.save_pretrained(folder)
    return folder


def is_adapter_dir(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def domain_adapters(folder: str | os.PathLike) -> list[str]:
    """The domains of a per-domain adapter folder (one peft folder each), else []."""
    folder = Path(folder)
    if not folder.is_dir() or is_adapter_dir(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if is_adapter_dir(p))


def merge_adapter(backbone: Backbone) -> Backbone:
    """Folds LoRA into the base weights (W + scale * B A): a plain transformers model, no peft at inference."""
    from peft import PeftModel

    if isinstance(backbone.model, PeftModel):
        backbone.model = backbone.model.merge_and_unload()
    return backbone


def load_adapted_backbone(
    base: str, folder: str | os.PathLike, merge: bool = True, domain: str | None = None
) -> Backbone:
    """The base backbone with the adapter in `folder` (merged unless merge=False), or the full fine-tuned
    model that `folder` holds. `base`: the registry name or directory the adapter was trained on.
    Per-domain adapters: `domain`'s adapter, or the base backbone for a domain without one (a new domain)."""
    from peft import PeftModel

    domains = domain_adapters(folder)
    if domains:
        if domain is None:
            raise ValueError(f"{folder} holds one adapter per domain ({', '.join(domains)}): name the domain")
        if domain not in domains:
            return load_backbone(base).eval()
        folder = Path(folder) / domain
    if not is_adapter_dir(folder):
        return load_backbone(Path(folder))
    backbone = load_backbone(base)
    with _quiet_peft():
        backbone.model = PeftModel.from_pretrained(backbone.model, str(folder))
    backbone.eval()
    return merge_adapter(backbone) if merge else backbone


def write_merged(backbone: Backbone, folder: str | os.PathLike, domain: str | None = None) -> Path:
    """A merged copy of the backbone as a Hugging Face directory: `load_backbone(folder)` loads it anywhere
    (the Ray Data embedding job reads it). Per-domain adapters: `domain`'s adapter is merged. The backbone itself
    is left as it was."""
    import copy

    from peft import PeftModel

    folder = Path(folder)
    model = backbone.model
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model)
        model = model.merge_and_unload(adapter_names=[domain]) if domain else model.merge_and_unload()
    model.save_pretrained(folder)  # type: ignore[operator]  # a transformers model
    backbone.tokenizer.save_pretrained(folder)
    return folder


def build_end_to_end(
    cfg: TrainConfig,
    recommender: CrossRecModel,
    texts: Sequence[str],
    item_domains: Sequence[str] | None = None,
    workers: int = 1,
) -> EndToEndModel:
    """Loads cfg.backbone, applies cfg.lora, and joins it to `recommender`. item_domains: each text's domain
    (needed by per-domain adapters); workers: the ranks sharing each step's batch."""
    zero3 = cfg.strategy == "deepspeed" and cfg.deepspeed.zero_stage == 3 and bool(cfg.backbone_grad_items)
    if getattr(cfg, "side_dims", None):
        # The encoder yields text vectors only; graph/feature side vectors are a cached-mode input for now.
        raise ValueError("`mode` end-to-end does not take side vectors (graph/feature columns) yet; use `mode` cached")
    backbone = apply_lora(load_backbone(cfg.backbone), cfg.lora, sorted(set(item_domains or [])))
    return EndToEndModel(
        recommender,
        ItemTextEncoder(backbone, texts, cfg.max_tokens, item_domains if cfg.lora.per_domain else None),
        grad_items=cfg.backbone_grad_items,
        max_items=_items_per_step(cfg, workers, len(set(item_domains or [])) or 2) if zero3 else 0,
        bank_steps=cfg.backbone_bank_steps,
    )


def init_backbone_from_bundle(backbone: Backbone, cfg: TrainConfig, bundle_path: str | os.PathLike) -> list[str]:
    """Warm start of an end-to-end run: the source bundle's `adapter/` loaded into `backbone` (already prepared by
    `apply_lora` for this run). One adapter -> this run's adapter, or every per-domain adapter of this run;
    per-domain adapters -> the same-named adapters of this run (a domain the source lacks keeps its fresh, zero-B
    adapter: the base backbone, as zero-shot uses); a full fine-tune -> every weight. Returns what was loaded
    ("default", domain names, or "full"); [] when the source has no adapter (a cached-mode bundle)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(bundle_path) / "adapter"
    if not folder.is_dir():
        return []
    mine = adapter_names(backbone) or (["default"] if isinstance(backbone.model, PeftModel) else [])
    if not is_adapter_dir(folder) and not domain_adapters(folder):  # a full fine-tune: a whole model directory
        if mine:
            raise ValueError(
                "`init_from`: the bundle fine-tuned every backbone weight; this run trains LoRA "
                "adapters (set `lora.enabled: false` to continue a full fine-tune)"
            )
        src = load_backbone(folder).model.state_dict()
        backbone.model.load_state_dict(src)
        return ["full"]
    if not mine:
        raise ValueError(
            "`init_from`: the bundle has LoRA adapters; this run fine-tunes every weight "
            "(`lora.enabled: false`): set `lora.enabled: true` to continue from them"
        )
    src = {d: folder / d for d in domain_adapters(folder)} or {"default": folder}
    loaded = []
    for name in mine:
        source = src.get(name) if len(src) > 1 or "default" not in src else src["default"]
        if source is None:
            continue
        import json

        conf = json.loads((source / ADAPTER_CONFIG).read_text())
        want = {"r": int(cfg.lora.rank), "lora_alpha": float(cfg.lora.alpha)}
        have = {"r": int(conf.get("r")), "lora_alpha": float(conf.get("lora_alpha"))}
        if want != have:
            raise ValueError(
                f"`init_from`: the bundle's adapter has lora.rank={have['r']}, lora.alpha="
                f"{have['lora_alpha']:g}; this run lora.rank={want['r']}, lora.alpha="
                f"{want['lora_alpha']:g}: they must match"
            )
        result = set_peft_model_state_dict(
            backbone.model, load_file(str(source / "adapter_model.safetensors")), adapter_name=name
        )
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ValueError(
                f"`init_from`: the bundle's adapter does not fit this backbone (unexpected "
                f"{unexpected[:3]}; different lora.target_modules?)"
            )
        loaded.append(name)
    return loaded
