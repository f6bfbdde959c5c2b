"""Training on several processes launched by torchrun: DDP or FSDP2, one process per GPU
(or per CPU process with the gloo backend, which is how the tests run it).

The rest of petra is single-process code; this module holds what differs:

- `Dist`: the process group (rank, world size, mode) and the few collectives the loop needs;
- `wrap`: DistributedDataParallel around the model, or FSDP2's `fully_shard` on every
  decoder layer and on the root (parameters become row-sharded DTensors, Shard(0));
- helpers for code that updates parameters in place whether or not FSDP2 sharded them:
  `local` (this rank's rows, aliasing the parameter), `full` (all rows, gathered) and
  `local_part` (this rank's rows of a tensor every rank holds in full);
- `RowSharded`: a row-sharded gradient as GaLore's projector sees it: products with thin
  matrices, so a projector refresh never gathers the (m, n) gradient.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import ConfigError

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


# -- tensors that may be FSDP2 shards ------------------------------------------------------
def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t; for a DTensor under no_grad, an alias that in-place ops update."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `value` (held in full, identically, by every rank), laid out as `like`."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def shaped_like(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This process's rows x of a tensor laid out as parameter p (optimizer state kept
    local, as LocalAdamW keeps it), as a DTensor when p is one, so that `full` gathers it."""
    if not isinstance(p, DTensor) or isinstance(x, DTensor):
        return x
    return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def local_state(obj) -> object:
    """A (nested) state dict with every DTensor replaced by its local shard, for saving."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [local_state(v) for v in obj]
    return obj


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


def sum_square_over_shards(norm: torch.Tensor, sharded: bool) -> torch.Tensor:
    """The global norm from this process's norm of its gradient rows: under FSDP2 every
    process holds some rows of every gradient, so the squares add up over processes."""
    if not sharded:
        return norm
    sq = norm.float().square()
    dist.all_reduce(sq)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (the same kernels, eps and clamp), on local gradient
    rows: under FSDP2 only the norm is communicated, never a DTensor op. Returns the
    global norm before clipping; max_norm <= 0 only measures."""
    grads = [local(p.grad) for p in params]
    norm = sum_square_over_shards(torch.nn.utils.get_total_norm(grads), any(is_sharded(p) for p in params))
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
    return norm


class RowShards:
    """How FSDP2's Shard(0) splits the m rows of a parameter: torch.chunk over the group."""

    def __init__(self, p: DTensor):
        mesh = p.device_mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.m = p.shape[0]
        self.chunk = math.ceil(self.m / self.world)
        self.start = min(self.rank * self.chunk, self.m)
        self.stop = min(self.start + self.chunk, self.m)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, part: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """Concatenate every rank's rows (each at most `chunk`) into the full matrix."""
        total = self.m if total is None else total
        chunk = math.ceil(total / self.world)
        padded = part.new_zeros((chunk, *part.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat(parts)[:total]

    def columns(self, n: int) -> slice:
        """This rank's share of n columns (for low-rank state kept split by columns)."""
        c = math.ceil(n / self.world)
        return slice(min(self.rank * c, n), min((self.rank + 1) * c, n))

    def gather_columns(self, part: torch.Tensor, n: int) -> torch.Tensor:
        return self.gather_rows(part.t(), n).t()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.start:self.stop]


def row_shards(p: torch.Tensor) -> RowShards | None:
    """The row split of an FSDP2 parameter, or None for a plain (replicated) tensor."""
    if not isinstance(p, DTensor):
        return None
    from torch.distributed.tensor import Shard
    if p.device_mesh.ndim != 1 or p.placements != (Shard(0),):
        raise NotImplementedError(f"GaLore handles FSDP2's 1-D Shard(0) layout, not {p.placements}")
    return RowShards(p)


class RowSharded:
    """An (m, n) gradient split by rows over ranks, seen through products with thin matrices
    (the interface of projector.Dense): G X gathers rows of a thin result, G^T Y sums
    per-rank products. The projector never needs the (m, n) matrix in one place."""

    def __init__(self, g_local: torch.Tensor, shards: RowShards, n: int):
        self.g, self.s = g_local.float(), shards
        self.shape = (shards.m, n)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.s.gather_rows(self.g @ x)

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        return self.s.sum(self.g.t() @ self.s.rows(y))

    def full(self) -> torch.Tensor:
        return self.s.gather_rows(self.g)

    def finite(self) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(self.g).all() else 1.0], device=self.g.device)
        return float(self.s.sum(bad)) == 0.0

    @property
    def device(self) -> torch.device:
        return self.g.device

    def t(self):
        from .optim.projector import Transposed
        return Transposed(self)
