"""torch.compile with a fallback, written once: compile problems must never end a run.

`with_fallback(compiled, eager, what)` calls `compiled` until a call raises; from then on
it warns once and calls `eager`. Used for the model's forward (`compile_model`) and for the
8-bit Adam update (optim/adam8bit.py). A leaf: torch only.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch


def with_fallback(
    compiled: Callable,
    eager: Callable,
    what: str,
    on_fallback: Callable[[], None] | None = None,
    on_first: Callable[[float], None] | None = None,
) -> Callable:
    """A function that runs `compiled`, or `eager` for good once `compiled` has raised.
    `on_first(seconds)` hears how long the first (compiling) call took; `on_fallback()` may
    undo what compiling changed (e.g. per-layer compiled modules) before the eager call."""
    state = {"ok": True, "first": True}

    def call(*args, **kwargs):
        if state["ok"]:
            t0 = time.perf_counter()
            try:
                out = compiled(*args, **kwargs)
            except Exception as e:  # any compile trouble: dynamo, inductor, a missing compiler
                warnings.warn(f"torch.compile failed for {what} ({type(e).__name__}: {e}); running it eagerly")
                state["ok"] = False
                if on_fallback is not None:
                    on_fallback()
            else:
                if state["first"] and on_first is not None:
                    on_first(time.perf_counter() - t0)
                state["first"] = False
                return out
        return eager(*args, **kwargs)

    return call


def raise_recompile_limit(n: int = 64) -> None:
    """Allow `n` specializations per compiled function (one per tensor shape, where a model
    has a few dozen at most) instead of dynamo's default of 8."""
    import torch._dynamo.config as dc

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, knob):
            setattr(dc, knob, max(getattr(dc, knob), n))


def compile_model(module, log, parts_of=None) -> Callable:
    """The forward to train with: `module` compiled whole, or (`parts_of` the
    LlamaForCausalLM) each decoder layer and the loss compiled on their own, as torchtitan
    does, so that FSDP2's per-layer gathers and layer-wise updates run between compiled
    graphs. (Under DDP, per-layer graphs measured 0.50x of the plain path at 60m against
    0.85x for the whole model compiled, DDP splitting it at bucket boundaries. With
    layer-wise updates a whole-model graph has one backward node that hands out every
    weight gradient at once: at 7b that put all 12.5 GiB of gradients in the peak, 31.0 GiB
    against 19.2 GiB eagerly.) Compile failures fall back to eager with a warning."""
    if parts_of is not None:
        parts_of.compile_parts(True)
        compiled = module
    else:
        compiled = torch.compile(module)
    return with_fallback(
        compiled,
        module,
        "the model forward",
        on_fallback=(lambda: parts_of.compile_parts(False)) if parts_of is not None else None,
        on_first=lambda s: log(f"compiled the model forward in {s:.1f}s"),
    )
