"""APOLLO, APOLLO-Mini and Fira: low-rank Adam moments that scale the full gradient
(optim/apollo.py), each with fp32 or 8-bit moments."""

from __future__ import annotations

from ..config import ConfigError
from ..optim.apollo import ApolloAdamW, ApolloAdamW8bit, FiraAdamW, FiraAdamW8bit
from .galore import GaLore


class Apollo(GaLore):
    OPTIMIZERS = {
        "apollo": (ApolloAdamW, "APOLLO (AdamW)"),
        "apollo8bit": (ApolloAdamW8bit, "APOLLO (AdamW 8-bit)"),
        "apollo-mini": (ApolloAdamW, "APOLLO-Mini (AdamW)"),
        "apollo-mini8bit": (ApolloAdamW8bit, "APOLLO-Mini (AdamW 8-bit)"),
        "fira": (FiraAdamW, "Fira (AdamW)"),
        "fira8bit": (FiraAdamW8bit, "Fira (AdamW 8-bit)"),
    }

    def check(self):
        super().check()
        if self.cfg.method.layerwise and self.cfg.train.grad_clip > 0:
            raise ConfigError(
                f"{self.name} with method.layerwise needs train.grad_clip=0: its update scales the full "
                "gradient, which layer-wise clipping does not keep (the norm-growth limiter bounds each "
                "update instead)"
            )

    def group_options(self) -> dict:
        m = self.cfg.method
        if self.name.startswith("fira"):
            return super().group_options()
        options = dict(
            update_proj_gap=m.update_proj_gap, stagger_refresh=m.stagger_refresh, scale=m.scale, proj_type=m.proj_type
        )
        if self.name.startswith("apollo-mini"):
            options["scale_type"] = "tensor"
        return options
