"""Newton-Schulz time for one Muon step's hidden matrices of a preset (issue 35): one matrix
at a time as before, with the CUDA zero-padding, and stacked by shape as petra's Muon now runs.

    python benchmarks/muon_ns.py --preset 1b     # on a GPU; prints ms per step and TFLOP/s
"""

import argparse
import json
import time

import torch

from petra.config import PRESETS, ModelConfig
from petra.memory import shapes
from petra.optim.functional import newton_schulz


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    args = ap.parse_args()
    mats = shapes(ModelConfig(**PRESETS[args.preset])).targets
    us = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for m, n in mats]
    # 5 iterations of 3 products on the wide orientation: 2 r^2 n + 2 r^3 + 2 r^2 n flops each
    flop = sum(5 * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3) for m, n in mats)
    by_shape = {}
    for u in us:
        by_shape.setdefault(tuple(u.shape), []).append(u)
    stacks = [torch.stack(v) for v in by_shape.values()]
    rows = {
        "one at a time, unpadded (before)": lambda: [newton_schulz(u, align=1) for u in us],
        "one at a time, padded to 64": lambda: [newton_schulz(u) for u in us],
        "stacked by shape, unpadded": lambda: [newton_schulz(s, align=1) for s in stacks],
        "stacked by shape, padded to 64 (now)": lambda: [newton_schulz(s) for s in stacks],
    }
    out = {"preset": args.preset, "matrices": len(mats), "tflop": flop / 1e12, "device": torch.cuda.get_device_name()}
    for name, fn in rows.items():
        ms = timed(fn)
        out[name] = {"ms": round(ms, 2), "tflops": round(flop / ms / 1e9, 1)}
        print(f"{args.preset} {name}: {ms:.1f} ms, {flop / ms / 1e9:.0f} TFLOP/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
