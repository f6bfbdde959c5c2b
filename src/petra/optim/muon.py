"""Muon (momentum orthogonalized by Newton-Schulz) for 2-D matrices, on one process, under
DDP and under FSDP2.

The update is torch.optim.Muon's: B = mu B + (1 - mu) G (as lerp), U = G + mu (B - G) with
Nesterov, O = NS(U) in bf16, W <- W (1 - lr wd) - lr' O with lr' from `adjust_lr_fn`. Under
FSDP2 a rank holds some rows of every matrix and of its momentum: the momentum is updated
row by row where it lives, and each matrix's U is orthogonalized whole on one owner rank
(rowsharded.orthogonalize_by_owner), as torchtitan's DistMuon and Dion distribute it; the
result equals the one-process update, since every operation on a row is the same and the
orthogonalization sees the same whole matrix.

`step(found_inf=...)` skips a step whose gradient is not finite on the device, with no host
sync: the momentum moves toward itself (unchanged, bit for bit) and the update is multiplied
by 0. Muon counts no steps, so nothing is put back later; only the first step, which creates
the momentum, decides on the host.
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

    stack_elements = 1 << 28  # matrices of one shape orthogonalized as one stack of at most this many elements
    takes_found_inf = True  # step(found_inf=...) skips on the device

    def state_layout(self, p, group, key, state) -> int | None:
        """For checkpoints that reshard: the momentum is FSDP2's rows of the parameter."""
        return 0 if key == "momentum_buffer" else None

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ok = None  # on the device: False skips the step
        if found_inf is not None:
            new = any(
                "momentum_buffer" not in self.state[p]
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            )
            if new and bool(found_inf):  # the first step creates state: decided on the host
                return loss
            ok = None if new else found_inf == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            us = self._momentum(params, group, ok)
            whole = [(p, u) for p, u in zip(params, us) if not is_sharded(p)]
            rows = [(p, u) for p, u in zip(params, us) if is_sharded(p)]

            def ortho(us, group=group):
                return self._orthogonalized(us, group)

            done = list(zip((p for p, _ in whole), ortho([u for _, u in whole])))
            if rows:
                from .rowsharded import orthogonalize_by_owner

                done += list(zip((p for p, _ in rows), orthogonalize_by_owner(rows, ortho)))
            self._apply(done, group, ok)
        return loss

    def _orthogonalized(self, us: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Newton-Schulz of each matrix; those of one shape as one stack (one batched iteration
        for all of them, `_stacks`)."""
        out: list = [None] * len(us)
        for batch in self._stacks(list(enumerate(us))):
            x = torch.stack([u for _, u in batch]) if len(batch) > 1 else batch[0][1]
            x = newton_schulz(x, group["ns_steps"], group["eps"])
            for (i, _), o in zip(batch, x.unbind(0) if len(batch) > 1 else [x]):
                out[i] = o
        return out

    def _momentum(self, params: list[torch.Tensor], group: dict, ok=None) -> list[torch.Tensor]:
        """B = mu B + (1 - mu) G and the matrices to orthogonalize (G + mu (B - G) with
        Nesterov, else B), as multi-tensor kernels; in fp32 where the buffers' dtype is not
        the gradients' (computed there, stored rounded once). A skipped step (`ok` False)
        reads B for G: B moves toward itself and stays as it was."""
        mu = group["momentum"]
        gs = [local(p.grad) for p in params]
        bufs = [
            self.state[p].setdefault("momentum_buffer", torch.zeros_like(g, dtype=self.moment_dtype))
            for p, g in zip(params, gs)
        ]
        if ok is not None:
            gs = [torch.where(ok, g, b) for g, b in zip(gs, bufs)]
        if all(b.dtype == g.dtype for b, g in zip(bufs, gs)):
            torch._foreach_lerp_(bufs, gs, 1 - mu)
            ms = bufs
        else:
            gs, ms = [g.float() for g in gs], [b.float() for b in bufs]
            torch._foreach_lerp_(ms, gs, 1 - mu)
            torch._foreach_copy_(bufs, ms)
        return torch._foreach_lerp(gs, ms, mu) if group["nesterov"] else ms

    def _stacks(self, pairs: list[tuple]) -> list[list[tuple]]:
        """(key, matrix) pairs in groups of one matrix shape, of at most stack_elements each."""
        by_shape: dict[tuple, list] = {}
        for p, u in pairs:
            by_shape.setdefault((tuple(u.shape), u.dtype, u.device), []).append((p, u))
        out = []
        for items in by_shape.values():
            per = max(1, self.stack_elements // items[0][1].numel())
            out += [items[i : i + per] for i in range(0, len(items), per)]
        return out

    def _apply(self, done: list[tuple[torch.Tensor, torch.Tensor]], group: dict, ok=None) -> None:
        """W <- W (1 - lr wd) - lr' O, one multi-tensor kernel per shape (lr' depends on it);
        a skipped step (`ok` False) multiplies by 1 and adds 0 O."""
        by_shape: dict[tuple, tuple[list, list]] = {}
        for p, o in done:
            w = local(p)
            entry = by_shape.setdefault(tuple(p.shape), ([], []))
            entry[0].append(w)
            entry[1].append(o.to(w.dtype))
        for shape, (ws, os_) in by_shape.items():
            if ok is not None:
                torch._foreach_mul_(os_, ok.to(os_[0].dtype))
            if group["weight_decay"]:
                decay = 1 - group["lr"] * group["weight_decay"]
                torch._foreach_mul_(ws, decay if ok is None else torch.where(ok, decay, 1.0))
            torch._foreach_add_(ws, os_, alpha=-muon_lr(group["lr"], group["adjust_lr_fn"], shape))
