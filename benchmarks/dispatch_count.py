"""Operations one optimizer step dispatches, counted on the CPU: on a GPU each is a kernel
launch (or a host-side scalar), the host work of a step that waits on the host.

    python benchmarks/dispatch_count.py --preset 60m --methods galore,apollo-mini,fira

Builds the preset's model in bf16 on the CPU, runs two steps of batch 2 x 16, and counts the
third's operations (views and reads of CPU step counts are not counted, as in
tests/conftest.dispatched), with the plain group's norms one at a time and stacked
(`GaLoreOptimizer.stacks_vectors`). 350m needs about 6 GB of memory.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from petra.config import build_config  # noqa: E402
from petra.methods import make_method  # noqa: E402
from petra.model import build_model  # noqa: E402
from petra.optim.galore import GaLoreAdamW  # noqa: E402
from petra.parallel import NoParallel  # noqa: E402


def count(method: str, preset: str, stack_vectors: bool) -> collections.Counter:
    GaLoreAdamW.stacks_vectors = stack_vectors
    ov = {"preset": preset, "method.name": method, "train.batch_size": 2, "train.seq_len": 16}
    cfg = build_config(overrides=ov)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", torch.bfloat16)
    m = make_method(cfg, NoParallel())
    model = m.prepare(model)
    opt = m.optimizer(model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    ops = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
                ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    for i in range(3):
        model(x, x).backward()
        if i < 2:
            m.step(model, opt)
        else:
            with Count():
                m.step(model, opt)
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="60m")
    ap.add_argument("--methods", default="galore,apollo-mini,fira")
    args = ap.parse_args()
    print("| preset | method | one at a time | stacked | `_to_copy` | `where` |\n|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        a, b = (count(method, args.preset, s) for s in (False, True))
        copies, wheres = "aten._to_copy.default", "aten.where.self"
        print(
            f"| {args.preset} | {method} | {sum(a.values())} | {sum(b.values())} | "
            f"{a[copies]} -> {b[copies]} | {a[wheres]} -> {b[wheres]} |"
        )


if __name__ == "__main__":
    main()
