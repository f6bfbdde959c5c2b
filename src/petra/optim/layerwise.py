"""Layer-wise updates: each parameter is updated inside backward, as soon as its gradient
is accumulated, and the gradient is freed at once, so a full set of gradients never exists.

The reference implementation steps each parameter on every backward, which breaks gradient
accumulation, and never sees a global norm, which breaks clipping. Here:

- accumulation: hooks act only while `armed` (the loop arms them for the last micro-batch);
  earlier micro-batches accumulate into .grad as usual;
- clipping: the hook records ||G|| and keeps only the *projected* gradient
  (the size of one optimizer moment for low-rank parameters) before freeing G; `finish()`
  then knows the exact global norm and applies every update with the clip coefficient,
  or none of them when the norm is not finite (the step is skipped, on the device).
  Without clipping the update happens directly in the hook and cannot be skipped.

Under FSDP2 the hook fires on each parameter's reduced gradient shard as soon as FSDP2 has
it, so layer-wise updates keep their memory saving there; the global norm sums the shards'
squares over processes. Under DDP a hook would see the gradient before the all-reduce, and
DDP's buckets already hold a full gradient copy, so `after_backward=True` runs the same
updates once backward (and the all-reduce) is done.
"""

from __future__ import annotations

import torch

from ..dtensor import is_sharded, local, sum_square_over_shards
from .galore import GaLoreOptimizer


class LayerwiseStepper:
    def __init__(self, optimizer: GaLoreOptimizer, grad_clip: float = 0.0, after_backward: bool = False):
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError(
                "layer-wise updates need a petra optimizer (GaLoreAdamW, GaLoreAdamW8bit, "
                f"GaLoreAdafactor), got {type(optimizer).__name__}"
            )
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.after_backward = after_backward
        self.armed = False
        self._sharded = False  # seen an FSDP2 (DTensor) parameter: norms need a sum over ranks
        self._norms: list[torch.Tensor] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        self._handles = []
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, index: int):
        # the group is looked up when the hook fires: optimizer.load_state_dict (a resume)
        # replaces the group dicts, and the schedule sets the learning rate in the new ones
        def hook(p: torch.Tensor) -> None:
            if self.armed and not self.after_backward:
                self._take(p, self.optimizer.param_groups[index])

        return hook

    def _take(self, p: torch.Tensor, group: dict) -> None:
        # per-tensor norms, combined as torch.nn.utils.clip_grad_norm_ does
        self._norms.append(torch.linalg.vector_norm(local(p.grad)))
        self._sharded = self._sharded or is_sharded(p)
        r = self.optimizer.project_grad(p, group)
        if self.grad_clip > 0:
            self._pending.append((p, r, group))
        else:
            self.optimizer.apply_update(p, r, group)
        p.grad = None

    def finish(self) -> torch.Tensor:
        """Apply pending (clipped) updates; returns the global gradient norm."""
        if self.after_backward:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._take(p, group)
        norm = torch.linalg.vector_norm(torch.stack(self._norms)) if self._norms else torch.zeros(())
        norm = sum_square_over_shards(norm, self._sharded)
        if self._pending:  # skipped on the device if the norm is not finite: no host sync
            ok = torch.isfinite(norm)
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            by_group: dict[int, tuple[dict, list, list]] = {}
            for p, r, group in self._pending:
                entry = by_group.setdefault(id(group), (group, [], []))
                entry[1].append(p)
                entry[2].append(r)
            for group, ps, rs in by_group.values():  # one batched update per group
                self.optimizer.apply_updates(ps, rs, group, coef, ok)
        self._pending, self._norms, self.armed = [], [], False
        return norm

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
