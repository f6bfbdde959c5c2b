"""The method as the loop sees it: checks, an optional model transform, an optimizer, a
schedule and a per-step hook. `Method` itself is full-rank AdamW; every other method refines it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..optim import AdamW, LayerwiseStepper, LocalAdamW
from ..parallel import NoParallel
from ..schedule import lr_factor


@dataclass
class StepEnd:
    """What a method's step-end hook did. `model` and `optimizer` are the ones to go on
    with; `params_changed` says the set of trainable parameters changed (the parallel
    strategy re-wraps); `event` and `fields` go to the log and metrics."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params_changed: bool = False
    event: str = ""
    fields: dict = field(default_factory=dict)


class Method:
    """Full-rank AdamW; the base every method refines."""

    name = "full"
    optimizer_name = "AdamW"
    warm_start = False

    def __init__(self, cfg: RunConfig, parallel: NoParallel | None = None):
        self.cfg = cfg
        self.parallel = parallel or NoParallel()
        self.layerwise: LayerwiseStepper | None = None

    def check(self) -> None:
        """Refuse what this method cannot do under its parallel strategy, before any work."""
        if self.cfg.method.layerwise and not self.supports_layerwise:
            raise ConfigError(f"method.layerwise is for the full and low-rank methods, not {self.name}")
        if self.cfg.method.int8_weights != "off" and self.parallel.active:
            raise ConfigError(
                "method.int8_weights runs in one process (its codes are neither replicated by DDP nor sharded "
                "by FSDP2); leave train.parallel at none, or use bf16 weights on several GPUs"
            )
        if self.parallel.sharded and self.unsharded_because:
            raise ConfigError(
                f"{self.name} does not run under FSDP2 ({self.unsharded_because}); use train.parallel=ddp"
            )

    supports_layerwise = True
    unsharded_because = ""  # why the method needs whole parameters, if it does

    @property
    def moment_dtype(self) -> torch.dtype | None:
        """method.moments as a dtype; None for auto (each optimizer's own)."""
        return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[self.cfg.method.moments]

    def _layerwise(self, opt) -> LayerwiseStepper:
        # where a hook sees the gradient before its all-reduce (DDP), update after backward
        self.layerwise = LayerwiseStepper(
            opt, self.cfg.train.grad_clip, after_backward=not self.parallel.hooks_see_synced_grads
        )
        return self.layerwise

    # -- model and optimizer -------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.cfg.method.layerwise:  # petra's AdamW matches torch's and can step in backward
            opt = self._petra_adamw(params, self.moment_dtype or torch.float32)
            self._layerwise(opt)
            return opt
        return self.adamw(params)

    def _petra_adamw(self, params: list[torch.Tensor], moment_dtype: torch.dtype) -> AdamW:
        t = self.cfg.train
        return AdamW(
            params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay, moment_dtype=moment_dtype
        )

    def adamw(self, params: list[torch.Tensor]) -> LocalAdamW | AdamW:
        """torch's AdamW with the run's settings (fused on CUDA), on local shards under FSDP2;
        petra's where method.moments asks for another dtype than the weights' (torch's kernels
        keep the moments in the weights' dtype)."""
        t = self.cfg.train
        want = self.moment_dtype
        if want is not None and any(p.dtype != want for p in params):
            return self._petra_adamw(params, want)
        fused = all(p.is_cuda for p in params)
        return LocalAdamW(
            params,
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            fused=fused or None,
            foreach=None if fused else False,
        )

    # -- per step ------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        t = self.cfg.train
        return lr_factor(step, t.steps, self.cfg.warmup_steps, t.min_lr_ratio)

    def before_backward(self, last_micro_batch: bool) -> None:
        if self.layerwise is not None:
            self.layerwise.armed = last_micro_batch

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Clip and update; returns the gradient norm (before clipping). A non-finite norm
        means no update at all: the weights and the optimizer state stay as they were."""
        if self.layerwise is not None:
            return self.layerwise.finish()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = self.parallel.clip_grad_norm(params, self.cfg.train.grad_clip)
        if getattr(optimizer, "takes_found_inf", False):  # decided on the device (no host sync)
            optimizer.step(found_inf=(~torch.isfinite(norm)).float())
        elif bool(torch.isfinite(norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepEnd:
        """After update `step` (0-based): may change the model or optimizer (ReLoRA)."""
        return StepEnd(model, optimizer)

    # -- what compare reports ------------------------------------------------------------
    def describe(self) -> dict:
        return {"rank": "full", "warm_start": "no", "optimizer": self.optimizer_name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
