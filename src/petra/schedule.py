"""Learning-rate schedules as pure functions of the step (so resuming needs no state).

`lr_factor(step)` multiplies the peak learning rate for the update made at `step` (0-based):
linear warmup over `warmup` steps, cosine decay to `min_ratio` at the last step, and, for
ReLoRA, a jagged variant: at every restart step the factor drops to 0 and rises linearly
back to the cosine envelope over `restart_warmup` steps.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Sequence


def cosine_envelope(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(
    step: int, total: int, warmup: int, min_ratio: float, restarts: Sequence[int] = (), restart_warmup: int = 0
) -> float:
    f = cosine_envelope(step, total, warmup, min_ratio)
    i = bisect_right(restarts, step)
    if i and restart_warmup > 0:
        since = step - restarts[i - 1]
        if since < restart_warmup:
            f *= since / restart_warmup
    return f


def set_lr(optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor
