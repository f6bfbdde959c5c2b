"""The optimizers' math as pure functions on tensors (the classes in this package are thin
shells that keep state and call these). No state, no param groups, no petra imports.

    R = project(G, P, Q)                  # the gradient in the low-rank space
    m, v = adam_moments_(m, v, R, b1, b2) # moments updated in place (lists: one foreach kernel)
    den = adam_denominators(v, t, b2, eps)
    W += back(-lr * scale * m / den / (1 - b1^t))   # add_back_
"""

from __future__ import annotations

import math

import torch


def sides(shape: torch.Size, proj_type: str) -> tuple[bool, bool]:
    """(project rows, project columns) for an (m, n) matrix. std projects the shorter side
    and a square matrix from the right, as galore-torch does (measured better: on the mini
    preset 0.1 nats lower loss than from the left; docs/agreement.md)."""
    m, n = shape
    if proj_type == "std":
        return (m < n, m >= n)
    return {"left": (True, False), "right": (False, True), "full": (True, True)}[proj_type]


def project(g: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    """P^T G Q with either side optional: (r, n), (m, r) or (r, r); or a stack of them
    (a leading batch dimension on G, P and Q)."""
    if P is not None:
        g = P.to(g.dtype).mT @ g
    if Q is not None:
        g = g @ Q.to(g.dtype)
    return g


def back_project(d: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """P d Q^T (either side optional) computed in `dtype`."""
    P, Q = (None if x is None else x.to(dtype) for x in (P, Q))
    d = d.to(dtype)
    if P is not None:
        d = P @ d
    return d if Q is None else d @ Q.mT


def add_back_(
    w: torch.Tensor, d: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None, dtype: torch.dtype | None = None
) -> None:
    """w += P d Q^T (either side optional) as one fused addmm (baddbmm for a stack).

    `dtype`: the product's own dtype where it is not w's, then added into w. An fp32 product
    runs on a GPU without its tensor cores: Fira's two back-projections into fp32 gradients
    were most of its step's excess over APOLLO's (docs/benchmarks.md, eleventh session)."""
    if dtype is not None and dtype != w.dtype:
        w.add_(back_project(d, P, Q, dtype))
        return
    d = d.to(w.dtype)
    mm_ = w.baddbmm_ if w.dim() == 3 else w.addmm_
    if P is not None and Q is not None:
        mm_(P.to(w.dtype) @ d, Q.to(w.dtype).mT)
    elif P is not None:
        mm_(P.to(w.dtype), d)
    else:
        mm_(d, Q.to(w.dtype).mT)


def adam_moments_(
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    grads: list[torch.Tensor],
    b1: float,
    b2: float,
    ok: torch.Tensor | None = None,
) -> None:
    """m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, in place, as torch.optim.AdamW does.

    With `ok` (a 0-d bool tensor) the update happens only if it is True, decided on the
    device: a False turns the coefficients into those of b1 = b2 = 1, which leave m and v
    exactly as they were provided the gradients are finite (zeroed by the caller). True gives
    the same bits as the plain update."""
    if ok is None:
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
    else:
        torch._foreach_lerp_(ms, grads, [torch.where(ok, 1 - b1, 0.0)] * len(ms))
        torch._foreach_mul_(vs, torch.where(ok, b2, 1.0))
    torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)


def adam_denominators(vs: list[torch.Tensor], steps: list[float], b2: float, eps: list[float]) -> list[torch.Tensor]:
    """sqrt(v) / sqrt(1 - b2^t) + eps: torch.optim.AdamW's operations in its order, so a
    parameter without projection is updated bit for bit as torch updates it."""
    den = torch._foreach_sqrt(vs)
    torch._foreach_div_(den, [math.sqrt(1 - b2**t) for t in steps])
    torch._foreach_add_(den, eps)
    return den


def adam_step_bound(b1: float, b2: float, t: float) -> float:
    """The largest |m_hat| / sqrt(v_hat) exact Adam can reach at step t, whatever the
    gradients: by Cauchy-Schwarz, m_t^2 <= (1-b1)^2 S_t v_t / (1-b2) with
    S_t = sum_{k<t} (b1^2/b2)^k. (1 at the first step; 7.3 for betas 0.9, 0.999 later.)
    Infinite when b1^2 >= b2, where no bound holds."""
    rho = b1 * b1 / b2
    if rho >= 1:
        return math.inf
    s = (1 - rho**t) / (1 - rho)
    return (1 - b1) / (1 - b1**t) * math.sqrt(s * (1 - b2**t) / (1 - b2))


def adafactor_direction(
    r: torch.Tensor,
    state: dict,
    t: float,
    eps: tuple[float, float],
    decay_rate: float,
    clip_threshold: float,
    beta1: float | None,
    split=None,
) -> torch.Tensor:
    """Adafactor's update direction for gradient r (Shazeer & Stern 2018), with a fixed
    learning rate: a factored second moment for matrices (row and column means), a full one
    otherwise, RMS clipping, and an optional first moment of the unscaled update. The
    moments live in `state` (created on first use) and are updated in place.

    With `split` (rowsharded.Split) r is this rank's rows (dim 0) or columns (dim 1) of the
    whole: the means across the cut dimension, the mean of the row moments (when rows are
    cut) and the RMS sum over the ranks; the moments are this rank's share."""
    beta2t = 1.0 - t**decay_rate
    sq = r * r + eps[0]
    if r.dim() == 2:
        if "exp_avg_sq_row" not in state:
            state["exp_avg_sq_row"] = torch.zeros(r.shape[0], device=r.device)
            state["exp_avg_sq_col"] = torch.zeros(r.shape[1], device=r.device)
        if split is None:
            row_now, col_now = sq.mean(dim=1), sq.mean(dim=0)
        elif split.dim == 0:  # rows cut: a column's mean sums over the ranks
            row_now, col_now = sq.mean(dim=1), split.sum(sq.sum(dim=0)) / split.size
        else:
            row_now, col_now = split.sum(sq.sum(dim=1)) / split.size, sq.mean(dim=0)
        row = state["exp_avg_sq_row"].mul_(beta2t).add_(row_now, alpha=1 - beta2t)
        col = state["exp_avg_sq_col"].mul_(beta2t).add_(col_now, alpha=1 - beta2t)
        row_mean = row.mean() if split is None or split.dim == 1 else split.sum(row.sum()) / split.size
        u = r * (row / row_mean).rsqrt()[:, None] * col.rsqrt()[None, :]
    else:
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(r)
        v = state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1 - beta2t)
        u = r * v.rsqrt()
    if split is None:
        rms = u.pow(2).mean().sqrt()
    else:  # the whole's size: the cut dimension's length times the other's
        other = u.shape[1 - split.dim] if u.dim() == 2 else 1
        rms = (split.sum(u.pow(2).sum()) / (split.size * other)).sqrt()
    u = u / (rms / clip_threshold).clamp(min=1.0)
    if beta1 is not None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(u)
        u = state["exp_avg"].lerp_(u, 1 - beta1).clone()
    return u


def channel_scales(direction: torch.Tensor, r: torch.Tensor, dim: int, tensor_wise: bool) -> torch.Tensor:
    """How much the low-rank optimizer scales each channel of the projected gradient r:
    ||direction[channel]|| / ||r[channel]||, the norms taken over the projected (rank)
    dimension `dim`, so one factor per row or column of the full gradient (APOLLO's
    channel-wise scaling, Fira's residual scaling); or one factor for the whole tensor
    (APOLLO-Mini). The result broadcasts against the full gradient. A stack of matrices
    (k, m, n) gets each matrix's own factors."""
    if tensor_wise:
        whole = (-2, -1) if direction.dim() == 3 else None
        return torch.linalg.vector_norm(direction, dim=whole, keepdim=True) / (
            torch.linalg.vector_norm(r, dim=whole, keepdim=True) + 1e-8
        )
    num = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
    return num / (torch.linalg.vector_norm(r, dim=dim, keepdim=True) + 1e-8)


def limit_norm_growth(
    update: torch.Tensor, previous: torch.Tensor | None, gamma: float, unit: float = 1.0, shards=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: an update whose norm exceeds gamma x the previous
    update's is scaled down to exactly that; returns (update, its norm / unit). Norms are
    compared in units of `unit`, Adam's bias correction sqrt(1 - b2^t) / (1 - b1^t), as the
    reference packages do: its own step-to-step growth (about 1% a step in the first
    thousands of steps) would otherwise hold every early update at the limit. A gradient-norm
    clip that adapts to the run instead of a fixed threshold; gamma <= 0 turns it off. With
    `shards` (rowsharded.RowShards) `update` is this rank's rows and the norm is the whole one.
    A stack of updates (k, m, n) is limited matrix by matrix (k norms)."""
    stacked = update.dim() == 3
    norm = torch.linalg.vector_norm(update, dim=(-2, -1) if stacked else None)
    if shards is not None:
        norm = shards.sum(norm.square()).sqrt()
    norm = norm / unit
    if previous is None or gamma <= 0:
        return update, norm
    factor = (norm / (gamma * previous).clamp(min=1e-30)).clamp(min=1.0)
    return update / (factor[:, None, None] if stacked else factor), norm / factor


def scaled_step_(
    w: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    lr: float,
    gamma: float,
    unit: float,
    coef: float | torch.Tensor = 1.0,
    ok: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    back: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    shards=None,
) -> torch.Tensor:
    """APOLLO's and Fira's update of w from its full gradient g, element-wise, and the norm the
    limiter keeps for the next step:

        u = limited((coef * G [+ residual]) * s)      (the step skipped where `ok` is False)
        W -= lr * (u [+ back])

    s: the channel (or tensor) scales; residual: Fira's -a P R, the gradient's part inside the
    subspace taken out; back: Fira's a P D; shards: as `limit_norm_growth`'s. All of it is
    passes over full-size tensors, which `fused_scaled_step_` fuses on a GPU."""
    u = g.float()
    if torch.is_tensor(coef) or coef != 1.0:
        u = u * coef
    if ok is not None:
        u = torch.where(ok, u, 0.0)
    if residual is not None:
        u = u + residual
    u, norm = limit_norm_growth(u * s, previous, gamma, unit, shards)
    if ok is not None:  # a previous norm of infinity limits nothing, as none does
        norm = torch.where(ok, norm, previous if previous is not None else torch.full_like(norm, math.inf))
    if back is not None:
        u = u + back
    w.add_(u.to(w.dtype).float() * -lr)  # (alpha=-lr would compile once for each lr)
    return norm


_compiled_scaled_step = None


def fused_scaled_step_(w, g, s, lr, gamma, unit, coef=1.0, ok=None, residual=None, back=None, previous=None):
    """`scaled_step_` compiled: its full-size passes (casts, the clipping factor, the skip, the
    scales, the limiter, the add) fused by Inductor. Symbolic shapes and floats (lr and the
    bias correction change every step), and no skip and no previous norm passed as their
    neutral values (a true flag, an infinite norm: the same numbers), so that a few
    compilations serve every stack and step."""
    if ok is None:
        ok = torch.ones((), dtype=torch.bool, device=g.device)
    if previous is None:
        previous = torch.full(g.shape[:-2], math.inf, device=g.device)
    global _compiled_scaled_step
    if _compiled_scaled_step is None:
        _compiled_scaled_step = torch.compile(scaled_step_, dynamic=True)
    return _compiled_scaled_step(w, g, s, lr, gamma, unit, coef, ok, residual, back, previous)


# Muon's quintic Newton-Schulz iteration (Jordan et al. 2024): coefficients chosen for the
# steepest slope at zero; 5 steps give U S' V^T with S' near 1, not exactly the polar factor
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    u: torch.Tensor, steps: int = 5, eps: float = 1e-7, coefficients=NS_COEFFICIENTS, align: int | None = None
) -> torch.Tensor:
    """The approximate orthogonalization of a matrix, or of a stack of matrices (..., m, n),
    in bf16: X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (a tall matrix
    is transposed and back), from X / ||X|| (each matrix's own norm), the scalars folded into
    the products (addmm / baddbmm beta and alpha).

    On CUDA a long side that is not a multiple of 8 (1b's 5461) is padded with zero columns to
    a multiple of `align` (64), which tensor cores need to run at full speed: exact, since zero
    columns leave X X^T as it is and stay zero through every iteration; they are cut off at
    the end."""
    a, b, c = coefficients
    x = u.bfloat16()
    tall = u.size(-2) > u.size(-1)
    if tall:
        x = x.mT
    n = x.size(-1)
    if align is None:  # widths tensor cores take as they are (a multiple of 8) are left alone
        align = 64 if x.is_cuda and n % 8 else 1
    pad = -n % align
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if pad:
        x = x[..., :n]
    return x.mT if tall else x


def muon_lr(lr: float, adjust: str | None, shape) -> float:
    """The learning rate Muon applies to an (m, n) matrix: `original` scales by
    sqrt(max(1, m / n)) (Jordan), `match_rms_adamw` by 0.2 sqrt(max(m, n)) (Moonlight: AdamW's
    update RMS, so AdamW's learning rate serves); None as original."""
    m, n = shape[0], shape[1]
    if adjust in (None, "original"):
        return lr * math.sqrt(max(1.0, m / n))
    if adjust == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr_fn={adjust!r}: choose original or match_rms_adamw")
