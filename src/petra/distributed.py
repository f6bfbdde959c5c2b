"""Training on several processes launched by torchrun: DDP or FSDP2, one process per GPU
(or per CPU process with the gloo backend, which is how the tests run it).

The rest of petra is single-process code; this module holds what differs:

- `Dist`: the process group (rank, world size, mode) and the few collectives the loop needs;
- `wrap`: DistributedDataParallel around the model, or FSDP2's `fully_shard` on every
  decoder layer and on the root (parameters become row-sharded DTensors, Shard(0));
- loading saved local shards into a sharded model.

Tensors that may be shards are handled by dtensor.py (a leaf); GaLore's row-sharded
gradient lives with the optimizers (optim/rowsharded.py).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError
from .dtensor import local

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main_process() -> bool:
    """Rank 0 under torchrun, or the only process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    mode: str = "none"   # none | ddp | fsdp
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup(parallel: str, device_type: str) -> Dist:
    """The process group of this run: joined when launched by torchrun, else none."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel={parallel!r} is not allowed; choose one of {', '.join(PARALLEL_MODES)}")
    if not launched():
        if parallel in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel={parallel} needs a launch by torchrun, e.g. "
                              f"torchrun --nproc_per_node 2 -m petra train --set train.parallel={parallel} ...")
        return Dist()
    mode = "ddp" if parallel == "auto" else parallel
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if mode == "none":
        if world > 1:
            raise ConfigError(f"launched on {world} processes but train.parallel=none; use ddp or fsdp")
        return Dist()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return Dist(mode, rank, world, local_rank)


def wrap(model: nn.Module, d: Dist, device: torch.device, reshard_after_forward: bool = True,
         unit_layers: int = 1) -> nn.Module:
    """The module the loop runs forward and backward on.

    DDP wraps the model (and is rebuilt when the set of trainable parameters changes, as at
    ReLoRA's switch from warm start to LoRA). FSDP2 shards the model in place, once; it
    follows later `requires_grad` changes by itself. reshard_after_forward=False keeps each
    layer's gathered weights from forward to backward (one all-gather per step, not two);
    unit_layers > 1 gathers that many consecutive layers as one FSDP2 unit (fewer, larger
    collectives and hooks, more memory while gathered).
    """
    if d.mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        # buffers (RoPE tables, ReLoRA's quantized weights) are equal on every process by
        # construction: no broadcast before every forward
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True, **no_sync)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule, fully_shard
        if not isinstance(model, FSDPModule):
            layers = list(model.model.layers)
            for i in range(0, len(layers), unit_layers):
                unit = layers[i:i + unit_layers]
                fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard_after_forward)
            fully_shard(model, reshard_after_forward=reshard_after_forward)
        return model
    return model


def grad_sync(wrapped: nn.Module, d: Dist, last_micro_batch: bool):
    """Gradient communication only on the last micro-batch of an accumulated step."""
    if d.mode == "ddp" and not last_micro_batch:
        return wrapped.no_sync()
    if d.mode == "fsdp":
        wrapped.set_requires_gradient_sync(last_micro_batch)
    return nullcontext()


@torch.no_grad()
def load_local_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved local shards into a sharded model (the same world size and layout)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise RuntimeError(f"sharded checkpoint lacks {missing[:4]}")
    for k, v in state.items():
        target = local(own[k])
        if target.shape != v.shape:
            raise RuntimeError(f"sharded checkpoint: {k} has local shape {tuple(v.shape)}, "
                               f"this process holds {tuple(target.shape)}")
        target.copy_(v)
