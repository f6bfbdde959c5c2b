"""GaLore: the gradient projected onto a low-rank subspace, the optimizer run there."""

from __future__ import annotations

from ..config import RunConfig
from ..optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from .base import Method


class GaLore(Method):
    """GaLore with AdamW, 8-bit AdamW or Adafactor, optionally layer-wise."""

    OPTIMIZERS = {
        "galore": (GaLoreAdamW, "AdamW"),
        "galore8bit": (GaLoreAdamW8bit, "AdamW 8-bit"),
        "galore-adafactor": (GaLoreAdafactor, "Adafactor"),
    }

    def __init__(self, cfg: RunConfig, parallel=None):
        super().__init__(cfg, parallel)
        self.name = cfg.method.name
        self.cls, self.optimizer_name = self.OPTIMIZERS[self.name]

    def group_options(self) -> dict:
        """The low-rank param group's settings, from the config."""
        m = self.cfg.method
        return dict(
            update_proj_gap=m.update_proj_gap,
            stagger_refresh=m.stagger_refresh,
            scale=m.scale,
            proj_type=m.proj_type,
            projector=m.projector,
            switch_state=m.switch_state,
        )

    def optimizer(self, model):
        t, m = self.cfg.train, self.cfg.method
        groups = galore_param_groups(model, m.rank, m.targets, **self.group_options())
        if self.cls is GaLoreAdafactor:
            opt = GaLoreAdafactor(groups, lr=t.lr, weight_decay=t.weight_decay)
        else:
            opt = self.cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
            if self.moment_dtype is not None:  # (config refuses it for the 8-bit forms)
                opt.moment_dtype = self.moment_dtype
        if m.layerwise:
            self._layerwise(opt)
        return opt

    def describe(self):
        m = self.cfg.method
        return {
            "rank": m.rank,
            "warm_start": "no",
            "optimizer": self.optimizer_name
            + (" layer-wise" if m.layerwise else "")
            + (f", {m.moments} moments" if m.moments != "auto" else "")
            + (f", int8 weights ({m.int8_weights} rounding)" if m.int8_weights != "off" else ""),
        }
