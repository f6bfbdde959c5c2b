"""Where a training step's GPU memory goes: allocated memory after building the model and
optimizer and the peak of each of N steps, then the tensors alive at the highest peak
grouped by the line of petra (or of the script) that allocated them, from torch's recorded
allocation history.

    python benchmarks/memory_stages.py --preset 7b --impl petra-galore8bit-lw --rank 1024 \\
        --batch 1 --micro 1 --ckpt --set train.grad_clip=0

The impl names and --set overrides are bench.py's; the model runs eagerly unless the impl
says ':compile'.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

GiB = 2**30


def alive_at_peak(events: list[dict], start: int = 0) -> tuple[int, list[dict]]:
    """Replays alloc/free events: (peak bytes from event `start` on, the allocations alive
    at that moment)."""
    total, best, best_i, size = 0, 0, -1, {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            size[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in size:
            total -= size.pop(e["addr"])
        if i >= start and total > best:
            best, best_i = total, i
    alive: dict = {}
    for e in events[: best_i + 1]:
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_requested":
            alive.pop(e["addr"], None)
    return best, list(alive.values())


def origin(frames: list[dict]) -> str:
    """The innermost frame in petra or in these scripts, with the torch call it made."""
    ours = [f for f in frames if "/petra/" in f["filename"] or "/benchmarks/" in f["filename"]]
    if not ours:
        return "(outside petra) " + (f"{frames[0]['name']}" if frames else "?")
    f = ours[0]
    return f"{Path(f['filename']).name}:{f['line']} {f['name']}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="60m")
    ap.add_argument("--impl", default="petra-galore8bit-lw")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gap", type=int, default=2, help="projector refresh interval: the steps include one")
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in a.set)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step, _, cfg, opt = bench.build(a.impl, a.preset, a.rank, a.micro, a.batch, a.gap, a.ckpt, extra)
    dev = bench.device()
    print(
        f"{a.preset} {a.impl}: after build {torch.cuda.memory_allocated() / GiB:.2f} GiB "
        f"(peak so far {torch.cuda.max_memory_allocated() / GiB:.2f}); optimizer state "
        f"{bench.optimizer_state_bytes(opt) / GiB:.2f} GiB",
        flush=True,
    )
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [
        tuple(torch.randint(0, cfg.model.vocab_size, (a.micro, cfg.seq_len), device=dev, generator=g) for _ in range(2))
        for _ in range(a.batch // a.micro)
    ]
    starts = []  # where each step's events begin
    for i in range(a.steps):
        starts.append(len(torch.cuda.memory._snapshot()["device_traces"][dev.index or 0]))
        torch.cuda.reset_peak_memory_stats()
        step(batches)
        torch.cuda.synchronize()
        print(
            f"step {i}: peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB, after "
            f"{torch.cuda.memory_allocated() / GiB:.2f} GiB, optimizer state "
            f"{bench.optimizer_state_bytes(opt) / GiB:.2f} GiB",
            flush=True,
        )
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][dev.index or 0]
    for name, start in (("the first step", starts[0]), ("the last step", starts[-1])):
        peak, alive = alive_at_peak(events, start)
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for e in alive:
            k = origin(e.get("frames", []))
            groups[k][0] += e["size"]
            groups[k][1] += 1
        print(f"alive at the peak of {name} ({peak / GiB:.2f} GiB):")
        for k, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: a.top]:
            print(f"  {size / GiB:7.3f} GiB  {n:5d} tensors  {k}")


if __name__ == "__main__":
    main()
