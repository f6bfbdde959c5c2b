"""Every host-device synchronization of a low-rank optimizer's step on CUDA, with the Python
stack that caused it: a step of a host-bound model should have none.

    python benchmarks/sync_points.py [--kind 8bit] [--steps 6]

Runs tests/test_skip.py's optimizer (staggered refreshes over a gap of 3, so most steps
refresh one matrix), a skipped step then a normal one after every two plain steps, under
torch.cuda.set_sync_debug_mode("warn"), and prints each distinct stack once with its count.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
from test_skip import _bad, _build, _grads, _params, _step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="8bit", help="an optimizer kind of tests/test_skip.py (KINDS)")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    params = _params("cuda", torch.bfloat16)
    opt = _build(a.kind, params)
    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):  # (not torch's "prototype feature" notice)
            stack = traceback.format_stack()[:-1]
            here = [s for s in stack if "/petra/" in s or "test_skip" in s][-6:]
            seen["".join(here) or "".join(stack[-6:])] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    for i, gs in enumerate(_grads(a.steps, "cuda", torch.bfloat16)):
        on = i >= 2  # after the first updates, which create state on the host by design
        if on:
            bad = _bad("cuda", torch.bfloat16)  # made outside: writing NaN from Python syncs
            torch.cuda.set_sync_debug_mode("warn")
            _step(opt, params, bad, found_inf=1)
        _step(opt, params, gs, found_inf=0)
        torch.cuda.set_sync_debug_mode(0)
    print(f"{a.kind}: {sum(seen.values())} synchronizations in {a.steps - 2} skipped + normal step pairs")
    for stack, n in seen.most_common():
        print(f"--- {n}x\n{stack}")


if __name__ == "__main__":
    main()
