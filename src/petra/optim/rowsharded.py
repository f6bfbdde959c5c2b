"""GaLore under FSDP2: a row-sharded gradient seen through products with thin matrices.

FSDP2's Shard(0) gives each rank some rows of every (m, n) gradient. `RowSharded` offers the
projector's interface (projector.Dense: `mm`, `tmm`, `full`), so a projector refresh
computes G X and G^T Y with one thin collective each and never gathers the (m, n) matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..dtensor import span
from .projector import Transposed


class RowShards:
    """How FSDP2's Shard(0) splits the m rows of a parameter: torch.chunk over the group."""

    def __init__(self, p: DTensor):
        mesh = p.device_mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.m = p.shape[0]
        self.chunk = math.ceil(self.m / self.world)
        self.start, self.stop = span(self.m, self.rank, self.world)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, part: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """Concatenate every rank's rows (each at most `chunk`, along dim 0) into the whole."""
        total = self.m if total is None else total
        chunk = math.ceil(total / self.world)
        padded = part.new_zeros((chunk, *part.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat(parts)[:total]

    def columns(self, n: int) -> slice:
        """This rank's share of n columns (for low-rank state kept split by columns)."""
        return slice(*span(n, self.rank, self.world))

    def gather_columns(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's share of the last dimension put together (a matrix, or a stack)."""
        return self.gather_rows(part.movedim(-1, 0), n).movedim(0, -1)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a matrix, or of each matrix of a stack."""
        return x[..., self.start : self.stop, :]


@dataclass
class Split:
    """How this rank's part of a (projected) gradient lies in the whole: cut along `dim` (0:
    rows, 1: columns) over `shards`, `size` the whole's length along it."""

    shards: RowShards
    dim: int
    size: int

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.shards.sum(t)


def row_shards(p: torch.Tensor) -> RowShards | None:
    """The row split of an FSDP2 parameter, or None for a plain (replicated) tensor."""
    if not isinstance(p, DTensor):
        return None
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
        return Transposed(self)


def sharded_channel_scales(
    d: torch.Tensor, r: torch.Tensor, left: bool, tensor_wise: bool, shards: RowShards, n: int
) -> torch.Tensor:
    """APOLLO's and Fira's channel scales (functional.channel_scales) of a row-sharded matrix:
    with a left projection this rank holds some columns of r and d, and each column's scale
    is gathered (n values); with a right one it holds its rows' r and d and their scales are
    its own. One scale per tensor sums the two squared norms over the ranks. A stack of
    matrices (k, m, n) (right projections: rows) gets each matrix's own scales."""
    from .functional import channel_scales

    if tensor_wise:
        whole = (-2, -1)
        sq = shards.sum(torch.stack([d.float().square().sum(whole), r.float().square().sum(whole)]))
        s = sq[0].sqrt() / (sq[1].sqrt() + 1e-8)
        return s[:, None, None] if d.dim() == 3 else s
    if left:
        return shards.gather_columns(channel_scales(d, r, -2, False), n)
    return channel_scales(d, r, -1, False)


def owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalizes each matrix: the largest first, each to the rank with the
    least Newton-Schulz work so far (m n min(m, n) a step). The same on every rank."""
    load = [0] * world
    out = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1], i)):
        m, n = shapes[i]
        r = min(range(world), key=lambda k: (load[k], k))
        out[i] = r
        load[r] += m * n * min(m, n)
    return out


def orthogonalize_by_owner(items: list[tuple[DTensor, torch.Tensor]], ortho) -> list[torch.Tensor]:
    """Muon under FSDP2: each row-sharded matrix (its parameter and this rank's rows of the
    update) is gathered on its owner rank, orthogonalized there and its rows sent back; the
    gathers, then every owner's own matrices, then the scatters run at once, so the ranks'
    Newton-Schulz work overlaps. `ortho` takes the list of an owner's matrices (Muon
    orthogonalizes those of one shape as a stack). Returns this rank's rows of each result."""
    shards = [RowShards(p) for p, _ in items]
    s0 = shards[0]
    who = owners([tuple(p.shape) for p, _ in items], s0.world)
    glob = [dist.get_global_rank(s0.group, r) for r in range(s0.world)]
    works, bufs = [], []
    for (p, u), s, o in zip(items, shards, who):
        padded = u.new_zeros((s.chunk, u.shape[1]))
        padded[: u.shape[0]] = u
        into = [torch.empty_like(padded) for _ in range(s.world)] if s.rank == o else None
        works.append(dist.gather(padded, into, dst=glob[o], group=s.group, async_op=True))
        bufs.append(into)
    for w in works:
        w.wait()
    mine = [i for i, (s, o) in enumerate(zip(shards, who)) if s.rank == o]  # this rank's own matrices
    done = dict(zip(mine, ortho([torch.cat(bufs[i])[: shards[i].m] for i in mine])))
    sends = []
    for i, s in enumerate(shards):
        if i in done:
            padded = done[i].new_zeros((s.chunk * s.world, done[i].shape[1]))
            padded[: s.m] = done[i]
            sends.append(list(padded.split(s.chunk)))
        else:
            sends.append(None)
    works, outs = [], []
    for (p, u), s, o, send in zip(items, shards, who, sends):
        out = torch.empty((s.chunk, u.shape[1]), dtype=torch.bfloat16, device=u.device)
        works.append(dist.scatter(out, send, src=glob[o], group=s.group, async_op=True))
        outs.append(out)
    for w in works:
        w.wait()
    return [out[: s.stop - s.start] for out, s in zip(outs, shards)]
