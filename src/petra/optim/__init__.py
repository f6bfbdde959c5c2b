"""Optimizers, drop-in `torch.optim.Optimizer`s importable with torch alone: AdamW (petra's,
steps inside backward for layer-wise updates), AdamW on local FSDP2 shards, GaLore with
AdamW, 8-bit AdamW or Adafactor, layer-wise stepping and param groups. The math is in
functional.py; torchao (8-bit state) is imported only when an 8-bit optimizer is built."""

from .adam8bit import GaLoreAdamW8bit
from .adamw import AdamW, LocalAdamW
from .apollo import APOLLO_MINI_GROUP, ApolloAdamW, ApolloAdamW8bit, FiraAdamW, FiraAdamW8bit
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreOptimizer
from .layerwise import LayerwiseStepper
from .param_groups import DEFAULT_TARGETS, galore_param_groups, matches_target, split_params, target_param_groups

__all__ = [
    "APOLLO_MINI_GROUP",
    "AdamW",
    "ApolloAdamW",
    "ApolloAdamW8bit",
    "FiraAdamW",
    "FiraAdamW8bit",
    "matches_target",
    "target_param_groups",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdafactor",
    "GaLoreOptimizer",
    "LayerwiseStepper",
    "LocalAdamW",
    "galore_param_groups",
    "split_params",
    "DEFAULT_TARGETS",
]
