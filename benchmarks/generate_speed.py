"""Sampling speed of `petra generate` (KV cache, one sequence) on a preset's model: random
weights, since speed does not depend on them; bf16 on CUDA.

    python benchmarks/generate_speed.py --preset 1b --new-tokens 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from petra.config import build_config  # noqa: E402
from petra.generate import generate  # noqa: E402
from petra.model import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = build_config(overrides={"preset": a.preset})
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    model = build_model(cfg.model, device, dtype).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (a.prompt_tokens,)).tolist()
    new = min(a.new_tokens, cfg.model.max_position_embeddings - a.prompt_tokens)
    times = []
    for i in range(a.repeats + 1):  # the first warms up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = generate(model, prompt, new, 0.8, 0, 1.0, i, None)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times[1:])
    print(
        json.dumps(
            {
                "preset": a.preset,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "prompt_tokens": a.prompt_tokens,
                "new_tokens": len(ids),
                "seconds": [round(t, 3) for t in times[1:]],
                "tokens_per_s": round(len(ids) / s, 1),
                "ms_per_token": round(1e3 * s / len(ids), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
