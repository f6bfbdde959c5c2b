"""Two AdamWs with torch.optim.AdamW's numbers.

`AdamW` is petra's own (the GaLore machinery without projection): the same operations as
torch's, and it can update one parameter at a time inside backward, which layer-wise
training needs.

`LocalAdamW` is torch's AdamW for FSDP2-sharded parameters, run on each process's local rows.

torch.optim.AdamW accepts DTensor parameters, but then each of its multi-tensor kernels
(and the clip before it) goes through DTensor dispatch: on one GPU at 60m that host-side
work was a large part of the step. AdamW is element-wise, so each process can update its
own rows with plain tensors and no communication at all. `LocalAdamW` does that with
torch's own functional AdamW (the same fused / foreach / single-tensor kernels), so its
numbers are torch's. Its state holds the plain local moments, keyed by the (DTensor)
parameters as usual: state_dict() saves this process's rows, as a sharded checkpoint wants.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from ..dtensor import local
from .galore import GaLoreAdamW


class AdamW(GaLoreAdamW):
    """torch.optim.AdamW's math and defaults; no low-rank param groups."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moment_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moment_dtype=moment_dtype)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("rank") is not None:
            raise ValueError("AdamW takes no low-rank groups (a 'rank' key); use GaLoreAdamW for those")
        super().add_param_group(param_group)


class LocalAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step updates local shards; for plain tensors it is AdamW."""

    takes_found_inf = True  # step(found_inf=...): on the device when fused

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        """torch's AdamW step; with `found_inf` (a 0-d tensor, non-zero = skip) the step is
        skipped, step counts included: on the device for the fused kernel (no host sync, as
        torch's GradScaler does it), by one host check otherwise."""
        if found_inf is not None and not all(g["fused"] for g in self.param_groups) and bool(found_inf):
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused = bool(group["fused"])
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                w = local(p)
                state = self.state[p]
                if not state:
                    # as torch: the step count lives on the device for the fused kernel
                    state["step"] = torch.zeros((), dtype=torch.float32, device=w.device if fused else "cpu")
                    state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                params.append(w)
                grads.append(local(p.grad))
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            b1, b2 = group["betas"]
            adamw(
                params,
                grads,
                ms,
                vs,
                [],
                steps,
                foreach=group["foreach"],
                fused=group["fused"],
                found_inf=found_inf if fused else None,
                amsgrad=False,
                beta1=b1,
                beta2=b2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        return loss
