"""Run under torchrun by test_distributed.py: one of petra's optimizers on row-sharded
matrices (FSDP2's layout: torch.chunk of the rows over the ranks) for 6 steps with a
refresh; rank 0 saves the whole matrices and the optimizer state each rank held."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

# two matrices each of (176, 64) and (64, 64), right projections, and of (64, 176), a left
# one: each pair updates as one stack of the ranks' shards
SHAPES = [(64, 176), (176, 64), (64, 64), (48, 30), (30, 48), (7, 9), (3, 16), (176, 64), (64, 64), (64, 176)]
ADAM_MINI_NAMES = ["mlp.up_proj", "mlp.down_proj", "o_proj", "k_proj", "q_proj", "x.bias", "norm"]
ADAM_MINI_NAMES += ["mlp.gate_proj", "v_proj", "mlp.w3"]


def make(name: str, params: list) -> torch.optim.Optimizer:
    """The optimizer under test, the same on one process and on several."""
    from petra.optim import APOLLO_MINI_GROUP, ApolloAdamW, FiraAdamW, GaLoreAdamW8bit
    from petra.optim.muon import Muon

    if name == "muon":
        return Muon(params, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    if name == "adam-mini":  # every block kind; heads of 6 rows straddle the ranks' rows of q_proj
        from petra.optim.adam_mini import AdamMini

        return AdamMini(zip(ADAM_MINI_NAMES, params), lr=1e-2, weight_decay=0.1, head_dim=6)
    low = {"params": params, "rank": 2, "update_proj_gap": 3}
    if name == "apollo":
        return ApolloAdamW([low], lr=1e-2, weight_decay=0.1)
    if name == "apollo-mini":
        return ApolloAdamW([{**low, **APOLLO_MINI_GROUP}], lr=1e-2)
    if name == "fira":
        return FiraAdamW([low], lr=1e-2)
    if name == "galore-adafactor":  # factored second moments: row and column means over the ranks
        from petra.optim import GaLoreAdafactor

        return GaLoreAdafactor([low], lr=1e-2, beta1=0.9, weight_decay=0.1)
    if name == "galore8bit":
        return GaLoreAdamW8bit([{**low, "projector": "randomized"}], lr=1e-2)
    raise ValueError(name)


def data():
    torch.manual_seed(0)
    whole = [torch.randn(*s) for s in SHAPES]
    grads = [[torch.randn(*s) for s in SHAPES] for _ in range(6)]
    grads[3] = [4 * g for g in grads[3]]  # a step whose update the norm-growth limiter holds back
    return whole, grads


if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole, grads = data()
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in whole]
    opt = make(name, params)
    stacked = []  # the matrices each stacked update took (GaLore's optimizers)
    if hasattr(opt, "_update_stack"):
        one_stack = opt._update_stack

        def counted(ps, *args, **kwargs):
            stacked.append(len(ps))
            return one_stack(ps, *args, **kwargs)

        opt._update_stack = counted
    for step in grads:
        for p, g in zip(params, step):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    from petra.dtensor import local_state

    torch.save(local_state(opt.state_dict()), f"{out}.rank{dist.get_rank()}")  # as a checkpoint keeps it
    full = [p.full_tensor() for p in params]
    from petra.metrics import optimizer_state_bytes

    held = torch.tensor([float(optimizer_state_bytes(opt))])
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        torch.save({"params": full, "state_bytes": float(held), "stacked": stacked}, out)
    dist.barrier()  # every rank done, the result on disk
    # gloo's teardown (destroy_process_group, then the interpreter's exit) now and then aborts a
    # rank with "terminate called without an active exception" on a loaded 2-core machine, after
    # all the work is done: this worker leaves without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
