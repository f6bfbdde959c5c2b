"""Low-rank subspaces of a gradient, as pure functions.

Every function returns an orthonormal basis of shape (m, r) for the column space of an
(m, n) matrix G; a right-side basis is the left basis of G^T. Three ways to get it:

- `svd_basis`: the paper's exact SVD (top-r left singular vectors). Slow at 1B/7B shapes.
- `randomized_basis`: a randomized range finder (Halko et al.) with power iterations.
- `subspace_basis`: warm-started subspace iteration from the previous basis. One iteration
  is two matmuls and a QR; it keeps the new basis close to the old one, which also keeps
  optimizer moments that live in the old coordinates meaningful.

All work happens in fp32 (SVD/QR in bf16 are unstable). The gradient enters as an operator
with products G X and G^T Y (`Dense` here; `rowsharded.RowSharded` for an FSDP2 shard),
so the same code runs on a gradient whose rows are spread over processes: only thin
(m, k) and (n, k) matrices ever travel, never the (m, n) gradient.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("petra.projector")


def working(t: torch.Tensor) -> torch.Tensor:
    """The precision bases are computed in: float32 at least (bf16 gradients are upcast),
    float64 kept (a float64 model's basis carries no float32 rounding)."""
    return t if t.dtype == torch.float64 else t.float()


class Dense:
    """A gradient held whole by this process."""

    def __init__(self, g: torch.Tensor):
        self.g = working(g)
        self.shape = tuple(g.shape)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.g @ x

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        return self.g.t() @ y

    def full(self) -> torch.Tensor:
        return self.g

    def finite(self) -> bool:
        return bool(torch.isfinite(self.g).all())

    def t(self) -> "Dense":
        return Dense(self.g.t())

    @property
    def device(self) -> torch.device:
        return self.g.device


class Transposed:
    """G^T of an operator G."""

    def __init__(self, a):
        self.a, self.shape = a, (a.shape[1], a.shape[0])

    def mm(self, x):
        return self.a.tmm(x)

    def tmm(self, y):
        return self.a.mm(y)

    def full(self):
        return self.a.full().t()

    def finite(self):
        return self.a.finite()

    def t(self):
        return self.a

    @property
    def device(self):
        return self.a.device


def _as_op(g):
    return Dense(g) if torch.is_tensor(g) else g


def _orth(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def svd_basis(g, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(_as_op(g).full(), full_matrices=False)
    return u[:, :rank]


def randomized_basis(
    g, rank: int, oversample: int = 8, power_iters: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    g = _as_op(g)
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, device=g.device, dtype=torch.float32, generator=generator).to(_dtype(g))
    q = _orth(g.mm(omega))
    for _ in range(power_iters):
        q = _orth(g.mm(g.tmm(q)))
    # rotate onto the top-r directions inside the range: a small (k, n) SVD of Q^T G
    ub, _, _ = torch.linalg.svd(g.tmm(q).t(), full_matrices=False)
    return q @ ub[:, :rank]


def _dtype(g) -> torch.dtype:
    return g.g.dtype if isinstance(g, Dense) else torch.float32


def subspace_basis(g, prev: torch.Tensor, iters: int = 1) -> torch.Tensor:
    g = _as_op(g)
    q = working(prev).to(_dtype(g))
    for _ in range(iters):
        q = _orth(g.mm(g.tmm(q)))
    return q


def captured_energy(g: torch.Tensor, basis: torch.Tensor) -> float:
    """||P^T G||_F^2 / ||G||_F^2: the share of the gradient the subspace keeps."""
    g = g.float()
    total = g.pow(2).sum()
    return float((basis.float().t() @ g).pow(2).sum() / total.clamp(min=1e-30))


def align_signs(basis: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """Fix the arbitrary sign of each basis vector.

    Singular vectors are defined up to sign. When optimizer moments are kept across a
    refresh (the paper's default), a flipped vector turns the kept moment against the new
    gradient coordinates. So each vector is signed to agree with the previous basis's vector
    of the same index, or, on the first refresh, to make its largest entry positive.
    """
    if prev is not None and prev.shape == basis.shape:
        s = torch.sign((prev.float() * basis).sum(0))
    else:
        idx = basis.abs().argmax(0)
        s = torch.sign(basis.gather(0, idx[None]).squeeze(0))
    return basis * torch.where(s == 0, torch.ones_like(s), s)


def gaussian_basis(m: int, rank: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """APOLLO's projection: an (m, r) matrix of N(0, 1/r) entries. No factorization and no
    gradient needed; not orthonormal, only an approximate isometry (Johnson-Lindenstrauss)."""
    return torch.randn(m, rank, device=device, generator=generator) / math.sqrt(rank)


def compute_basis(
    g,
    rank: int,
    method: str,
    prev: torch.Tensor | None,
    generator: torch.Generator | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """The sign-aligned left basis of g (a tensor or an operator such as Dense). `finite`:
    the caller guarantees g is finite, which spares the check (a host sync)."""
    return align_signs(_basis(_as_op(g), rank, method, prev, generator, finite), prev)


def _basis(
    g,
    rank: int,
    method: str,
    prev: torch.Tensor | None,
    generator: torch.Generator | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """The left basis of g by `method`; never raises for bad numerics.

    A non-finite gradient or a failing factorization keeps the previous basis (or falls
    back to exact SVD / a random orthonormal basis on the first refresh) and logs why.
    """
    if not finite and not g.finite():
        log.warning("gradient of shape %s is not finite; keeping the previous projector", tuple(g.shape))
        return prev if prev is not None else _random_basis(g, rank, generator)
    try:
        if method == "svd":
            return svd_basis(g, rank)
        if method == "randomized":
            return randomized_basis(g, rank, generator=generator)
        if method == "subspace":
            if prev is None:  # the first refresh has nothing to warm-start from
                return randomized_basis(g, rank, generator=generator)
            return subspace_basis(g, prev)
        raise ValueError(f"unknown projector method {method!r}; choose svd, randomized or subspace")
    except torch.linalg.LinAlgError as e:
        log.warning("projector refresh (%s) failed for shape %s: %s; falling back", method, tuple(g.shape), e)
        try:
            # a fresh random start with more oversampling and power iterations
            return randomized_basis(g, rank, oversample=16, power_iters=4, generator=generator)
        except torch.linalg.LinAlgError:
            return prev if prev is not None else _random_basis(g, rank, generator)


def _random_basis(g, rank: int, generator: torch.Generator | None) -> torch.Tensor:
    return _orth(torch.randn(g.shape[0], rank, device=g.device, generator=generator))
