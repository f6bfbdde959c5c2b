"""Validation: the loss on the held-out windows, with its standard error, and when to measure it."""

from __future__ import annotations

import math

import torch

from .parallel import NoParallel


@torch.no_grad()
def evaluate(model, batches, device, parallel: NoParallel | None = None, micro_batch: int = 0) -> tuple[float, float]:
    """(mean, standard error) of the validation loss over the rows of `batches` (each row a
    window's mean loss); with several processes each evaluates its share of the rows of
    every batch, `micro_batch` rows per forward."""
    p = parallel or NoParallel()
    was = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # (sum, sum of squares, rows)
    for x, y in batches:
        xs, ys = x.tensor_split(p.world)[p.rank], y.tensor_split(p.world)[p.rank]
        mb = micro_batch or len(xs)
        for xc, yc in zip(xs.split(mb), ys.split(mb)):
            r = model(xc.to(device), yc.to(device), per_row=True).double()
            total += torch.stack([r.sum(), r.square().sum(), torch.tensor(len(r), device=device)])
    p.all_reduce(total)
    model.train(was)
    s, sq, n = total.tolist()
    var = max(0.0, sq / n - (s / n) ** 2) * n / max(1.0, n - 1)
    return s / n, math.sqrt(var / n)


class Validator:
    """Evaluates every `every` steps and at the schedule's last step, but not less than half
    an interval before it (300 steps every 37: 37, ..., 259 and 300, not 296); keeps the last
    result."""

    def __init__(
        self, batches: list, device: torch.device, parallel: NoParallel, micro_batch: int, every: int, last_step: int
    ):
        self.batches, self.device, self.parallel, self.micro_batch = batches, device, parallel, micro_batch
        self.every, self.last_step = every, last_step
        self.loss: float | None = None
        self.se: float | None = None

    def due(self, step: int) -> bool:
        return step == self.last_step or (step % self.every == 0 and 2 * (self.last_step - step) >= self.every)

    def run(self, model) -> tuple[float, float]:
        self.loss, self.se = evaluate(model, self.batches, self.device, self.parallel, self.micro_batch)
        return self.loss, self.se
