"""Muon (momentum orthogonalized by Newton-Schulz) for 2-D matrices, on one process, under
DDP and under FSDP2.

The update is torch.optim.Muon's: B = mu B + (1 - mu) G (as lerp), U = G + mu (B - G) with
Nesterov, O = NS(U) in bf16, W <- W (1 - lr wd) - lr' O with lr' from `adjust_lr_fn`. Under
FSDP2 a rank holds some rows of every matrix and of its momentum: the momentum is updated
row by row where it lives, and each matrix's U is orthogonalized whole on one owner rank
(rowsharded.orthogonalize_by_owner), as torchtitan's DistMuon and Dion distribute it; the
result equals the one-process update, since every operation on a row is the same and the
orthogonalization sees the same whole matrix.
"""

from __future__ import annotations

import torch

from ..dtensor import is_sharded, local
from .functional import muon_lr, newton_schulz


class Muon(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        moment_dtype: torch.dtype | None = None,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon: lr {lr} and weight_decay {weight_decay} >= 0, momentum {momentum} in [0, 1)")
        muon_lr(1.0, adjust_lr_fn, (1, 1))  # a bad name fails here, not at the first step
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype  # of the momentum buffers (None: the gradients')
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates 2-D matrices; a parameter of shape {tuple(p.shape)} is not one")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            whole, rows = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = local(p.grad)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g, dtype=self.moment_dtype))
                if buf.dtype == g.dtype:
                    buf.lerp_(g, 1 - mu)
                    m = buf
                else:  # computed in fp32, stored rounded once
                    g, m = g.float(), buf.float().lerp_(g.float(), 1 - mu)
                    buf.copy_(m)
                u = g.lerp(m, mu) if group["nesterov"] else m
                (rows if is_sharded(p) else whole).append((p, u))

            def ortho(u, group=group):
                return newton_schulz(u, group["ns_steps"], group["eps"])

            done = [(p, ortho(u)) for p, u in whole]
            if rows:
                from .rowsharded import orthogonalize_by_owner

                done += list(zip((p for p, _ in rows), orthogonalize_by_owner(rows, ortho)))
            for p, o in done:
                w = local(p)
                w.mul_(1 - group["lr"] * group["weight_decay"])
                w.add_(o, alpha=-muon_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss
