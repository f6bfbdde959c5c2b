"""Several optimizers stepped as one `torch.optim.Optimizer` (Muon for hidden matrices,
AdamW for the rest): one list of param groups for the learning-rate schedule, one state
dict for checkpoints."""

from __future__ import annotations

import torch


class OptimizerChain(torch.optim.Optimizer):
    """The param groups are the inner optimizers' own group dicts, so setting a group's lr
    here sets it there; `state` is read-only (a merged view) and the state dict nests the
    inner ones in order."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        if not optimizers:
            raise ValueError("OptimizerChain needs at least one optimizer")
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @property
    def takes_found_inf(self) -> bool:
        """Whether step(found_inf=...) skips on the device: every inner optimizer does."""
        return all(getattr(o, "takes_found_inf", False) for o in self.optimizers)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and not self.takes_found_inf:
            raise TypeError(f"{self!r} cannot skip on the device: one of its optimizers takes no found_inf")
        for o in self.optimizers:
            if found_inf is None:
                o.step()
            else:
                o.step(found_inf=found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chain": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("chain")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"the saved optimizer state is not a chain of {len(self.optimizers)} optimizers")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return "OptimizerChain(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"
