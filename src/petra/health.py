"""Whether a run is still training: the checks made after every step.

- A step whose loss or gradient norm is not finite has been skipped (no update; the
  methods check the norm before stepping): `max_skipped` such steps in a row stop the run.
- Collapse: the gradient norm exactly 0 (a saturated network learns nothing more).
- Divergence that stays finite: the loss above ln(vocab) + 1, worse than a uniform guess.
Either, for `patience` steps in a row, stops the run as failed; divergence is warned about
from its first step. Perplexities are printed through `fmt_ppl`, which never overflows.

The normal range, in which a checkpoint may be written (`abnormal` says why not): a loss at
most ln(vocab) + 1, and a gradient norm not 0 and at most BLOWUP times the median of the
last steps' norms (a skipped, non-finite step left the weights as they were). A blow-up's weights can be finite and
still useless (|w| near 1e30): the last good checkpoint is the last one written in range.
"""

from __future__ import annotations

import math
from collections import deque

BLOWUP = 100.0  # a gradient norm this many times its recent median has left the normal range
MAX_PPL_LOSS = 30.0  # exp(30) = 1.1e13: past this a perplexity is no number worth printing


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite weights, divergence, collapse)."""


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None where it would overflow or mean nothing (loss above 30)."""
    if loss is None or not math.isfinite(loss) or loss > MAX_PPL_LOSS:
        return None
    return math.exp(loss)


def fmt_ppl(loss: float) -> str:
    p = perplexity(loss)
    return f"{p:.2f}" if p is not None else f"overflow (loss {loss:.4g})"


class Health:
    def __init__(self, vocab_size: int, max_skipped: int, patience: int, log=print):
        self.ceiling = math.log(vocab_size) + 1.0
        self.max_skipped, self.patience, self.log = max_skipped, patience, log
        self.skipped_in_row = self.skipped = 0
        self.above = self.zero = 0  # consecutive diverged / collapsed steps
        self.warned = False
        self.norms: deque[float] = deque(maxlen=100)  # recent finite, nonzero gradient norms
        self.last: tuple[float, float] | None = None  # the last step's (loss, gradient norm)
        self.reference: float | None = None  # the median norm of the steps before it (10 at least)

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def abnormal(self) -> str | None:
        """Why the last step left the normal range (module docstring), or None."""
        if self.last is None:
            return None
        loss, norm = self.last
        if not self.finite(loss, norm):
            return None  # a skipped step: the weights are the last good step's
        if loss > self.ceiling:
            return f"the loss {loss:.3f} is above ln(vocab) + 1 = {self.ceiling:.2f} (diverging)"
        if norm == 0.0:
            return "the gradient norm is exactly 0 (collapsed)"
        if self.reference is not None and norm > BLOWUP * self.reference:
            return f"the gradient norm {norm:.3g} is over {BLOWUP:g}x its recent median {self.reference:.3g}"
        return None

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """After step `step` (1-based); returns why the run must stop, or None."""
        self.last = (loss, grad_norm)
        self.reference = sorted(self.norms)[len(self.norms) // 2] if len(self.norms) >= 10 else None
        if not self.finite(loss, grad_norm):
            self.skipped += 1
            self.skipped_in_row += 1
            self.log(
                f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite, update skipped "
                f"({self.skipped_in_row} in a row; the run stops after {self.max_skipped})"
            )
            if self.skipped_in_row > self.max_skipped:
                return (
                    f"{self.skipped_in_row} steps in a row had a non-finite loss or gradient (the last at step {step})"
                )
            return None
        self.skipped_in_row = 0
        if grad_norm > 0.0:
            self.norms.append(grad_norm)
        self.zero = self.zero + 1 if grad_norm == 0.0 else 0
        self.above = self.above + 1 if loss > self.ceiling else 0
        if self.above == 1 and not self.warned:
            self.warned = True
            self.log(
                f"warning: step {step}: loss {loss:.3f} is above ln(vocab) + 1 = {self.ceiling:.2f}, worse "
                f"than a uniform guess: the run is diverging (lower train.lr)"
            )
        if self.patience and self.zero >= self.patience:
            return (
                f"collapsed: the gradient norm has been exactly 0 for {self.zero} steps (to step {step}); "
                f"the network is saturated and learns nothing"
            )
        if self.patience and self.above >= self.patience:
            return (
                f"diverged: the loss has stayed above ln(vocab) + 1 = {self.ceiling:.2f} for {self.above} steps "
                f"(now {loss:.3f} at step {step})"
            )
        return None
