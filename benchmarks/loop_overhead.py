"""One GPU: the step of petra's training loop under `train.parallel` none / ddp / fsdp, built
the way `train` builds it, timed at levels that add the loop's pieces one by one:
0 forward/backward/clip/update on a fixed batch, 1 + the learning-rate schedule, 2 + the
per-step all-reduce of loss and stop flag (a host sync), 3 + batches read from the token
cache, 4 + the method's step-end hook. Prints the median step in ms per level.

    PRESET=350m LEVELS=4,0 python benchmarks/loop_overhead.py none
    PRESET=350m LEVELS=4,0 torchrun --standalone --nproc_per_node 1 benchmarks/loop_overhead.py fsdp

The token cache comes from data.cache_dir=.carry/cache (change CACHE=...). On CPU it runs
eagerly with fp32 (a check that it works, not a measurement).
"""

import os
import statistics
import sys
import time

import torch

from petra.compiling import compile_model
from petra.config import build_config
from petra.data import Batches, prepare
from petra.methods import make_method
from petra.model import build_model
from petra.parallel import NoParallel, setup
from petra.schedule import set_lr

mode = sys.argv[1]
cuda = torch.cuda.is_available()
d = setup(mode, "cuda" if cuda else "cpu") if mode != "none" else NoParallel()
dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
if not cuda:
    torch.cuda.synchronize = lambda *a: None
cfg = build_config(
    overrides={
        "preset": os.environ.get("PRESET", "60m"),
        "method.name": "full",
        "train.batch_size": 64,
        "data.cache_dir": os.environ.get("CACHE", ".carry/cache"),
        "train.parallel": mode,
    }
)
data = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
batches = Batches(data.train, cfg.seq_len, 64, 0)
torch.manual_seed(0)
model = build_model(cfg.model, dev, torch.bfloat16 if cuda else torch.float32)
m = make_method(cfg, d)
model = m.prepare(model)
wrapped = d.wrap(model, dev)
opt = m.optimizer(model)
by_layer = d.compile_by_layer or m.layerwise is not None
fwd = compile_model(wrapped, print, parts_of=model if by_layer else None) if cuda else wrapped
x0, y0 = (t.to(dev) for t in batches.get(0))


def run(level, n=25):
    ts = []
    for step in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if level >= 1:
            set_lr(opt, m.lr_factor(step))
        x, y = (x0, y0) if level < 3 else (t.to(dev, non_blocking=True) for t in batches.get(step))
        with d.grad_sync(wrapped, True):
            loss = fwd(x, y)
            loss.backward()
        m.step(model, opt)
        if level >= 2:
            shared = d.all_reduce(torch.stack([loss.detach().float(), torch.tensor(0.0, device=dev)]))
            float(shared[0])
        if level >= 4:
            m.on_step_end(step, model, opt)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts[5:])


run(0, 8)
for level in [int(v) for v in os.environ.get("LEVELS", "0,1,2,3,4,0").split(",")]:
    print(f"{mode} level {level}: {run(level):.1f} ms", flush=True)
