"""APOLLO and Fira: AdamW moments kept in a low-rank space, used to scale the full gradient.

Drop-in `torch.optim.Optimizer`s built on the GaLore machinery (galore.py), differing in
the group defaults: how the subspace is drawn and how the low-rank direction becomes an
update (`GaLoreOptimizer._apply_lowrank`).

- APOLLO (Zhu et al. 2024, arXiv 2412.05270): a seeded Gaussian projection (no SVD); the
  low-rank Adam direction only measures how much each channel of the gradient should be
  scaled, and the full gradient G is stepped, scaled channel-wise (APOLLO) or by one
  factor per tensor (APOLLO-Mini, rank 1, scale sqrt(128)), with the norm-growth limiter.
- Fira (Chen et al. 2024, arXiv 2410.01623): GaLore's update plus the residual of the
  gradient outside the subspace, scaled channel-wise by the same ratio, with the limiter.

Groups without `rank` get AdamW. The update of a low-rank parameter needs its full gradient,
so these optimizers take no part in layer-wise updates with clipping (the method refuses).
"""

from __future__ import annotations

import math

from .adam8bit import GaLoreAdamW8bit
from .galore import LOWRANK_DEFAULTS, GaLoreAdamW

APOLLO_DEFAULTS = {**LOWRANK_DEFAULTS, "update": "apollo", "projector": "random", "scale": 1.0}
APOLLO_MINI_GROUP = {"rank": 1, "scale_type": "tensor", "scale": math.sqrt(128)}  # the paper's Mini
FIRA_DEFAULTS = {**LOWRANK_DEFAULTS, "update": "fira", "scale": 0.25}


class ApolloAdamW(GaLoreAdamW):
    """APOLLO: low-rank groups ({"params": ..., "rank": r}) default to a random projection
    refreshed every 200 steps, channel-wise scaling and scale 1; pass
    `**APOLLO_MINI_GROUP` in a group for APOLLO-Mini."""

    lowrank_defaults = APOLLO_DEFAULTS


class ApolloAdamW8bit(GaLoreAdamW8bit):
    """ApolloAdamW with 8-bit moments (the plain AdamW groups benefit: embeddings, head)."""

    lowrank_defaults = APOLLO_DEFAULTS


class FiraAdamW(GaLoreAdamW):
    """Fira: low-rank groups default to GaLore's subspace projector and scale 0.25 (the
    Fira scripts' value up to 350M; they use 0.0625 at 1B and 7B)."""

    lowrank_defaults = FIRA_DEFAULTS


class FiraAdamW8bit(GaLoreAdamW8bit):
    lowrank_defaults = FIRA_DEFAULTS
