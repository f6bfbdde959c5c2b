"""ReLoRA as a method: a full-rank warm start, then LoRA factors merged and restarted every
`reset_interval` steps with the factors' moments pruned and the learning rate re-warmed
(the layers themselves: lora.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..lora import ReLoRALinear, lora_modules, prune_moments, wrap
from ..schedule import lr_factor
from .base import Method, StepEnd


class ReLoRA(Method):
    name, optimizer_name, warm_start = "relora", "AdamW", True
    supports_layerwise = False

    def __init__(self, cfg: RunConfig, parallel=None):
        super().__init__(cfg, parallel)
        self.merges = 0  # merges done so far (the cycle)
        self.lora_phase = cfg.method.warm_start_steps == 0

    def check(self):
        super().check()
        if self.parallel.sharded and self.cfg.method.quantize != "none":
            raise ConfigError(
                "method.quantize does not run under FSDP2 (bitsandbytes codes are not sharded); use train.parallel=ddp"
            )

    # steps whose update starts a new cycle (lr re-warms from 0 there)
    def restarts(self) -> list[int]:
        m, total = self.cfg.method, self.cfg.train.steps
        ws = m.warm_start_steps
        out = [ws] if ws > 0 else []
        out += list(range(ws + m.reset_interval, total, m.reset_interval))
        return out

    def lr_factor(self, step: int) -> float:
        t = self.cfg.train
        return lr_factor(
            step, t.steps, self.cfg.warmup_steps, t.min_lr_ratio, self.restarts(), self.cfg.method.restart_warmup_steps
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        if not lora_modules(model):
            m = self.cfg.method
            wrap(model, m.targets, m.rank, m.lora_alpha)
            self._reinit(model)
        for mod in lora_modules(model):
            mod.set_lora_phase(self.lora_phase)
            if self.lora_phase:
                self._quantize(mod)
        return model

    def _quantize(self, mod: ReLoRALinear) -> None:
        kind = self.cfg.method.quantize
        if kind != "none" and mod.quantized is None:
            mod.quantize(kind)

    def _reinit(self, model: nn.Module) -> None:
        # A is drawn from a generator seeded by (seed, cycle): reproducible across resumes
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + self.merges)
        for mod in lora_modules(model):
            mod.reset_factors(g)

    def on_step_end(self, step, model, optimizer):
        m = self.cfg.method
        done = step + 1
        if not self.lora_phase:
            if done == m.warm_start_steps:
                old = optimizer
                self.lora_phase = True
                model = self.prepare(model)  # the factors exist: this flips requires_grad (and quantizes W)
                optimizer = self.optimizer(model)
                for p in (q for g in optimizer.param_groups for q in g["params"]):
                    if p in old.state:  # embeddings, norms, head keep their moments
                        optimizer.state[p] = old.state[p]
                return StepEnd(model, optimizer, params_changed=True, event="warm start ended: LoRA phase begins")
            return StepEnd(model, optimizer)
        if (done - m.warm_start_steps) % m.reset_interval or done >= self.cfg.train.steps:
            return StepEnd(model, optimizer)
        mods = lora_modules(model)
        for mod in mods:
            mod.merge()
        self.merges += 1
        self._reinit(model)
        lora_params = [p for mod in mods for p in (mod.lora_A, mod.lora_B)]
        g = torch.Generator().manual_seed(self.cfg.train.seed * 104729 + self.merges)
        frac = prune_moments(optimizer, lora_params, m.prune, m.prune_fraction, g, joint=m.prune_mask == "joint")
        return StepEnd(
            model,
            optimizer,
            event=f"ReLoRA merge {self.merges}: factors merged into the weights and restarted",
            fields={"moments_pruned": round(frac, 4)},
        )

    def describe(self):
        m = self.cfg.method
        return {
            "rank": m.rank,
            "warm_start": f"{m.warm_start_steps} steps" if m.warm_start_steps else "no",
            "optimizer": "AdamW" + (f", {m.quantize} frozen weights" if m.quantize != "none" else ""),
        }

    def state_dict(self):
        return {"merges": self.merges, "lora_phase": self.lora_phase}

    def load_state_dict(self, state):
        self.merges, self.lora_phase = state["merges"], state["lora_phase"]
