"""Optimizers: GaLore (AdamW, 8-bit AdamW, Adafactor), AdamW on local shards, layer-wise stepping,
param groups."""
from .adamw import LocalAdamW
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreOptimizer
from .layerwise import LayerwiseStepper
from .param_groups import DEFAULT_TARGETS, galore_param_groups, split_params

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "GaLoreOptimizer", "LayerwiseStepper", "LocalAdamW",
           "galore_param_groups", "split_params", "DEFAULT_TARGETS"]
