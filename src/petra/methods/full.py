"""Full-rank training with 8-bit AdamW state."""

from __future__ import annotations

from ..optim import GaLoreAdamW8bit
from .base import Method


class Full8bit(Method):
    name, optimizer_name = "full8bit", "AdamW 8-bit"

    def optimizer(self, model):
        t = self.cfg.train
        opt = GaLoreAdamW8bit(
            [p for p in model.parameters() if p.requires_grad],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
        )
        if self.cfg.method.layerwise:
            self._layerwise(opt)
        return opt
