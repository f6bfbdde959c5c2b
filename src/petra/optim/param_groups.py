"""Which parameters are low-rank targets (attention and MLP matrices) and which are not."""

from __future__ import annotations

import re

from torch import nn

DEFAULT_TARGETS = r"(self_attn|mlp)\.\w+_proj"


def split_params(model: nn.Module, targets: str = DEFAULT_TARGETS):
    """(low-rank, other): lists of (name, parameter) among the trainable parameters.

    A target is a 2-D parameter whose name matches the `targets` regex (searched, not
    anchored): by default q/k/v/o and gate/up/down projections. Embeddings, norms and the
    output head stay full rank.
    """
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"method.targets={targets!r} is not a valid regular expression ({e})") from None
    low, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (low if p.dim() == 2 and pattern.search(name) else other).append((name, p))
    if not low:
        raise ValueError(
            f"method.targets={targets!r} matches no 2-D parameter of the model; "
            f"example names: {[n for n, _ in list(model.named_parameters())[:4]]}"
        )
    return low, other


def galore_param_groups(model: nn.Module, rank: int, targets: str = DEFAULT_TARGETS, **lowrank) -> list[dict]:
    """Param groups for a GaLore optimizer: one low-rank group, one plain group."""
    low, other = split_params(model, targets)
    groups = [{"params": [p for _, p in low], "rank": rank, **lowrank}]
    if other:
        groups.append({"params": [p for _, p in other]})
    return groups
