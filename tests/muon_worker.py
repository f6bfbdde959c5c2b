"""Run under torchrun by test_distributed.py: petra's Muon on row-sharded matrices (FSDP2's
layout) for 6 steps; rank 0 saves the whole matrices to the file named in argv."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from petra.optim.muon import Muon

SHAPES = [(64, 176), (176, 64), (64, 64), (48, 30), (30, 48), (7, 9), (3, 16)]

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
whole = [torch.randn(*s) for s in SHAPES]
grads = [[torch.randn(*s) for s in SHAPES] for _ in range(6)]
params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in whole]
opt = Muon(params, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
for step in grads:
    for p, g in zip(params, step):
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
out = [p.full_tensor() for p in params]
state = sum(opt.state[p]["momentum_buffer"].numel() for p in params)
if dist.get_rank() == 0:
    torch.save({"params": out, "state_numel": state, "whole_numel": sum(w.numel() for w in whole)}, sys.argv[1])
dist.destroy_process_group()
