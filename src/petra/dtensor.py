"""Tensors that may be FSDP2 shards (DTensors) or plain tensors, handled alike.

Code that updates parameters in place (the optimizers, ReLoRA's merge) reads and writes
this process's rows through `local` (an alias of the local shard), gathers with `full`,
and takes its part of a value every rank holds with `local_part`. A leaf module: torch only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def span(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share of `total` along a dimension cut as FSDP2's Shard cuts
    it (torch.chunk's sizes: ceil(total / world) each, the last ones shorter or empty)."""
    chunk = -(-total // world)
    start = min(rank * chunk, total)
    return start, min(start + chunk, total)


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
