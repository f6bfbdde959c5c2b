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


def matches_target(name: str, targets: str | list[str]) -> bool:
    """transformers' `optim_target_modules` rule for a module name: a string is a regex that
    must match the whole name; a list matches a name it holds, a name containing one of its
    items, or a name one of its items matches as a whole regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)


def target_param_groups(model: nn.Module, targets: str | list[str], rank: int, **lowrank) -> list[dict]:
    """Param groups for any low-rank optimizer of petra, chosen as transformers'
    `optim_target_modules` chooses: the weights of the nn.Linear modules whose names match
    `targets` get `rank` (and the `lowrank` options); every other trainable parameter is a
    plain AdamW group."""
    low = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and matches_target(name, targets)
    }
    if not low:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ValueError(f"targets {targets!r} match no nn.Linear module; its names look like {linear}")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in low], "rank": rank, **lowrank}]
    rest = [p for p in params if id(p) not in low]
    return groups + ([{"params": rest}] if rest else [])
