"""How a run spreads over processes: one strategy object per mode (none, DDP, FSDP2).

Launched by torchrun, every process runs the same loop; the strategy holds everything
that differs between modes, so the loop (train.py) never tests a mode:

- the process group (rank, world size) and the two collectives the loop needs;
- `wrap` the model once, `rewrap` it when its set of trainable parameters changes;
- `grad_sync`: gradient communication only on the last micro-batch of a step;
- `clip_grad_norm` over whatever rows this process holds;
- `save` and `load` of checkpoints (one file for all, or one shard per process).

`NoParallel` is one process; DDP keeps whole replicas; FSDP2 (`fully_shard` on every
decoder layer and on the root) turns parameters into row-sharded DTensors, Shard(0).
Tensors that may be shards are handled by dtensor.py (a leaf); GaLore's row-sharded
gradient lives with the optimizers (optim/rowsharded.py).
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .config import CHOICES, ConfigError
from .dtensor import clip_grad_norm, is_sharded, local, local_state


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main_process() -> bool:
    """Rank 0 under torchrun, or the only process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


class NoParallel:
    """One process, the whole model; the base every strategy refines."""

    name = "none"
    sharded = False  # parameters are row shards: checkpoints are written per process
    hooks_see_synced_grads = True  # a post-accumulate-grad hook sees the step's final gradient
    compile_by_layer = False  # compile each decoder layer alone (collectives run between layers)

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.name != "none"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world={self.world})"

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- the model -------------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the loop runs forward and backward on."""
        return model

    def rewrap(self, model: nn.Module, wrapped: nn.Module, device: torch.device) -> nn.Module:
        """After the set of trainable parameters changed (ReLoRA's switch to LoRA)."""
        return wrapped

    def grad_sync(self, wrapped: nn.Module, last_micro_batch: bool):
        """A context for one micro-batch's forward and backward."""
        return nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm(params, max_norm)

    @torch.no_grad()
    def all_finite(self, model: nn.Module, device: torch.device) -> bool:
        """Every weight and floating buffer is finite on every process (each checks its rows)."""
        mine = all(
            bool(torch.isfinite(local(t)).all())
            for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point()
        )
        return float(self.all_reduce(torch.tensor(float(not mine), device=device))) == 0

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, out: Path, state: dict) -> None:
        """Replicated state: one process writes for all."""
        if self.main:
            checkpoint.save(out, state)
        self.barrier()

    def load(self, out: Path) -> dict:
        return checkpoint.load(out)

    def load_model(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def describe(self) -> str:
        """What the startup line adds: nothing for one process."""
        return f", {self.name} on {self.world} processes" if self.active else ""


class DDP(NoParallel):
    """Whole replicas; DistributedDataParallel all-reduces gradients in buckets during backward."""

    name = "ddp"
    hooks_see_synced_grads = False  # a hook fires before the bucket's all-reduce

    def wrap(self, model, device):
        from torch.nn.parallel import DistributedDataParallel

        # buffers (RoPE tables, ReLoRA's quantized weights) are equal on every process by
        # construction: no broadcast before every forward
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True, **no_sync
        )

    def rewrap(self, model, wrapped, device):
        return self.wrap(model, device)  # DDP tracks a fixed set of trainable parameters

    def grad_sync(self, wrapped, last_micro_batch):
        return nullcontext() if last_micro_batch else wrapped.no_sync()


class FSDP(NoParallel):
    """FSDP2: every decoder layer (or `unit_layers` of them) and the root are sharded in place.

    reshard_after_forward=False keeps each unit's gathered weights from forward to backward
    (one all-gather per step, not two); unit_layers > 1 gathers that many consecutive layers
    as one unit (fewer, larger collectives, more memory while gathered). FSDP2 follows later
    `requires_grad` changes by itself, so there is nothing to rewrap."""

    name = "fsdp"
    sharded = True
    compile_by_layer = True  # its gathers run between layers

    def __init__(self, rank=0, world=1, local_rank=0, unit_layers: int = 1, reshard_after_forward: bool = True):
        super().__init__(rank, world, local_rank)
        self.unit_layers, self.reshard_after_forward = unit_layers, reshard_after_forward

    def wrap(self, model, device):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(model, FSDPModule):
            layers = list(model.model.layers)
            for i in range(0, len(layers), self.unit_layers):
                unit = layers[i : i + self.unit_layers]
                fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=self.reshard_after_forward)
            fully_shard(model, reshard_after_forward=self.reshard_after_forward)
        return model

    def grad_sync(self, wrapped, last_micro_batch):
        wrapped.set_requires_gradient_sync(last_micro_batch)
        return nullcontext()

    def save(self, out, state):
        state = {**state, "sharded_keys": [k for k, v in state["model"].items() if is_sharded(v)]}
        checkpoint.save_sharded(out, local_state(state), self)

    def load(self, out):
        return checkpoint.load(out, rank=self.rank, world=self.world, sharded=True)

    @torch.no_grad()
    def load_model(self, model, state):
        """Copy saved local shards into the sharded model (the same world size and layout)."""
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise RuntimeError(f"sharded checkpoint lacks {missing[:4]}")
        for k, v in state.items():
            target = local(own[k])
            if target.shape != v.shape:
                raise RuntimeError(
                    f"sharded checkpoint: {k} has local shape {tuple(v.shape)}, "
                    f"this process holds {tuple(target.shape)}"
                )
            target.copy_(v)


STRATEGIES: dict[str, type[NoParallel]] = {"none": NoParallel, "ddp": DDP, "fsdp": FSDP}
PARALLEL_MODES = CHOICES["train.parallel"]  # auto = ddp


def setup(parallel: str, device_type: str, **fsdp_options) -> NoParallel:
    """The strategy of this run, joining the process group when launched by torchrun."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel={parallel!r} is not allowed; choose one of {', '.join(PARALLEL_MODES)}")
    if not launched():
        if parallel in ("ddp", "fsdp"):
            raise ConfigError(
                f"train.parallel={parallel} needs a launch by torchrun, e.g. "
                f"torchrun --nproc_per_node 2 -m petra train --set train.parallel={parallel} ..."
            )
        return NoParallel()
    mode = "ddp" if parallel == "auto" else parallel
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if mode == "none":
        if world > 1:
            raise ConfigError(f"launched on {world} processes but train.parallel=none; use ddp or fsdp")
        return NoParallel()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return strategy(mode, rank, world, local_rank, **fsdp_options)


def strategy(mode: str, rank: int = 0, world: int = 1, local_rank: int = 0, **fsdp_options) -> NoParallel:
    """The strategy object of `mode` (none, ddp, fsdp) for a process; `fsdp_options`
    (unit_layers, reshard_after_forward) apply to FSDP2 alone."""
    if mode == "fsdp":
        return FSDP(rank, world, local_rank, **fsdp_options)
    return STRATEGIES[mode](rank, world, local_rank)
