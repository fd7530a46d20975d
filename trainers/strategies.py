"""How `train_func` distributes one model: `ddp` (torch DDP via Ray Train) or `deepspeed` (ZeRO 1/2/3).

A strategy owns the wrapped model and its optimizer: `prepare` wraps, `step` runs forward/backward/update,
`gathered` makes every parameter whole on every rank (ZeRO-3 shards them), `save`/`load` write and read a
checkpoint folder. Every rank calls every method (DeepSpeed's are collective). Checkpoint folders always hold
`model.safetensors` (the recommender) and, end-to-end, `backbone.safetensors` (the trainable backbone weights:
LoRA matrices, or all weights) in float32, written by rank 0, so a bundle is exported without DeepSpeed;
`deepspeed/` holds the engine's own checkpoint (every rank its optimizer shard), which resuming reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crossrec.config import TrainConfig

__all__ = [
    "Strategy",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "make_strategy",
    "deepspeed_config",
    "current_weights",
    "load_weights",
    "DS_ENV",
]

# Environment a DeepSpeed worker needs from the driver: the accelerator (cpu without a GPU) and the cache of
# compiled ops (shm_comm, fused/cpu Adam: 40-90 s each to build, see RAY_NOTES.md).
DS_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "DS_BUILD_OPS")


def current_weights(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": recommender state, "backbone": trainable backbone weights (end-to-end only)}, float32, CPU."""
    from crossrec.finetune import EndToEndModel, trainable_backbone_state

    rec = module.recommender if isinstance(module, EndToEndModel) else module
    out = {"model": {k: v.detach().float().cpu().contiguous() for k, v in rec.state_dict(keep_vars=True).items()}}
    if isinstance(module, EndToEndModel):
        out["backbone"] = trainable_backbone_state(module.encoder.backbone)
    return out


def load_weights(module: nn.Module, folder: str) -> None:
    """Loads a checkpoint folder's float32 weights into a fresh (unwrapped) model."""
    from crossrec.finetune import EndToEndModel, load_backbone_state

    rec = module.recommender if isinstance(module, EndToEndModel) else module
    rec.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    if isinstance(module, EndToEndModel):
        load_backbone_state(module.encoder.backbone, load_file(os.path.join(folder, "backbone.safetensors")))


def _write_state(folder: str, weights: dict, state: dict) -> None:
    for name, tensors in weights.items():
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)


def _read_state(folder: str) -> dict:
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def _to(x, device: torch.device):
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


class Strategy:
    """Base: the unwrapped model is `module`; `net` is what the loss is computed with."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.module: nn.Module | None = None
        self.net: nn.Module | None = None
        self.opt = None

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """`current_weights` of the model; under ZeRO-3 call it inside `gathered()`."""
        return current_weights(self.module)

    def to_device(self, inputs: dict) -> dict:
        return {k: _to(v, self.device) for k, v in inputs.items()}

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)


class DDPStrategy(Strategy):
    """torch DDP over gloo (CPU) or NCCL (GPU) through Ray Train; bf16 autocast on GPUs that support it."""

    def prepare(self, model: nn.Module, groups: list[dict]) -> None:
        import ray.train.torch  # ray

        self.module = model
        self.opt = self._optimizer(groups)
        # prepare_model moves the model to the worker's device and wraps DDP (more than one worker).
        use = self.world > 1 or self.device.type != "cpu"
        self.net = ray.train.torch.prepare_model(model) if use else model  # ray
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def step(self, inputs: dict) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.net(**inputs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def save(self, folder: str, state: dict) -> None:
        if self.rank == 0:
            _write_state(folder, self.weights(), state)
            torch.save(self.opt.state_dict(), os.path.join(folder, "optimizer.pt"))

    def load(self, folder: str) -> dict:
        load_weights(self.module, folder)
        self.opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
        return _read_state(folder)


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world: int, bf16: bool) -> dict:
    """DeepSpeed's JSON config from our typed one. The optimizer is ours (torch AdamW, which DeepSpeed calls
    "untested" with ZeRO; DeepSpeedCPUAdam when the optimizer is offloaded)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch * ds.grad_accum * world,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Mixed precision as torch autocast: weights and optimizer state stay float32, matmuls run in bf16.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,  # our epoch lines report progress
    }


class DeepSpeedStrategy(Strategy):
    """`deepspeed.initialize` on the worker's process group (gloo on CPU with DS_ACCELERATOR=cpu, NCCL on GPUs)."""

    TAG = "ds"

    def prepare(self, model: nn.Module, groups: list[dict]) -> None:
        ds = self.cfg.deepspeed
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(
                "`strategy: deepspeed` needs DeepSpeed: pip install --no-build-isolation "
                "'crossrec[deepspeed]' (see README)"
            ) from e
        if ds.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, adamw_mode=True)
        else:
            opt = self._optimizer(groups)
        # bf16 where supported: CUDA with bf16 units, or CPU (slow without AMX, hence opt-in there too).
        bf16 = ds.bf16 and (self.device.type == "cpu" or torch.cuda.is_bf16_supported())
        micro = max(1, self.cfg.batch_size // self.world)
        self.module = model
        # DeepSpeed's initial broadcast views each parameter as bytes, which fails for 0-dim ones (the learned
        # temperature and text-prior weight): they train as 1-element vectors and are saved 0-dim again.
        self.scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        for p in model.parameters():
            if p.dim() == 0:
                p.data = p.data.reshape(1)
        self.net, self.opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config=deepspeed_config(self.cfg, micro, self.world, bf16),
            dist_init_required=False,
        )  # Ray Train already joined the process group

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        out = current_weights(self.module)
        prefix = "recommender." if "backbone" in out else ""
        for n in self.scalars:
            out["model"][n[len(prefix) :]] = out["model"][n[len(prefix) :]].reshape(())
        return out

    def step(self, inputs: dict) -> float:
        loss = self.net(**inputs)
        self.net.backward(loss)
        self.net.step()  # updates at gradient-accumulation boundaries only
        return float(loss.detach())

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        if self.cfg.deepspeed.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield

    def save(self, folder: str, state: dict) -> None:
        # Every rank writes its optimizer shard (and, ZeRO-3, its parameter shard) under deepspeed/.
        self.net.save_checkpoint(os.path.join(folder, "deepspeed"), tag=self.TAG, exclude_frozen_parameters=True)
        with self.gathered():
            if self.rank == 0:
                _write_state(folder, self.weights(), state)

    def load(self, folder: str) -> dict:
        # Frozen base weights are not in the checkpoint (they come from the pretrained backbone): non-strict.
        path, _ = self.net.load_checkpoint(os.path.join(folder, "deepspeed"), tag=self.TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {folder}/deepspeed")
        return _read_state(folder)


def make_strategy(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Strategy:
    """`strategy` of the config -> its class (ddp, the default, last)."""
    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, rank, world, device)
    return DDPStrategy(cfg, rank, world, device)
