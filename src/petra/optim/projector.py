"""Low-rank subspaces of a gradient, as pure functions.

Every function returns an orthonormal basis of shape (m, r) for the column space of an
(m, n) matrix G; a right-side basis is the left basis of G^T. Three ways to get it:

- `svd_basis`: the paper's exact SVD (top-r left singular vectors). Slow at 1B/7B shapes.
- `randomized_basis`: a randomized range finder (Halko et al.) with power iterations.
- `subspace_basis`: warm-started subspace iteration from the previous basis. One iteration
  is two matmuls and a QR; it keeps the new basis close to the old one, which also keeps
  optimizer moments that live in the old coordinates meaningful.

All work happens in fp32 (SVD/QR in bf16 are unstable) and the result is cast to `dtype`.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("petra.projector")


def _orth(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def svd_basis(g: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(g.float(), full_matrices=False)
    return u[:, :rank]


def randomized_basis(g: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    g = g.float()
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, device=g.device, dtype=g.dtype, generator=generator)
    q = _orth(g @ omega)
    for _ in range(power_iters):
        q = _orth(g @ (g.t() @ q))
    # rotate onto the top-r directions inside the range: a small (k, n) SVD
    ub, _, _ = torch.linalg.svd(q.t() @ g, full_matrices=False)
    return q @ ub[:, :rank]


def subspace_basis(g: torch.Tensor, prev: torch.Tensor, iters: int = 1) -> torch.Tensor:
    g = g.float()
    q = prev.float()
    for _ in range(iters):
        q = _orth(g @ (g.t() @ q))
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


def compute_basis(g: torch.Tensor, rank: int, method: str, prev: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    return align_signs(_basis(g, rank, method, prev, generator), prev)


def _basis(g: torch.Tensor, rank: int, method: str, prev: torch.Tensor | None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The left basis of g by `method`; never raises for bad numerics.

    A non-finite gradient or a failing factorization keeps the previous basis (or falls
    back to exact SVD / a random orthonormal basis on the first refresh) and logs why.
    """
    if not torch.isfinite(g).all():
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
            return randomized_basis(g + 1e-6 * torch.randn_like(g.float()), rank, generator=generator)
        except torch.linalg.LinAlgError:
            return prev if prev is not None else _random_basis(g, rank, generator)


def _random_basis(g: torch.Tensor, rank: int, generator: torch.Generator | None) -> torch.Tensor:
    return _orth(torch.randn(g.shape[0], rank, device=g.device, generator=generator))
