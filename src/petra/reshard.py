"""Checkpoints between process counts: an FSDP2 checkpoint saved by N processes resumed by M
(FSDP2), by one process or under DDP; a one-process or DDP checkpoint resumed under FSDP2.

Every saved tensor is either whole (the same on every process) or cut along one dimension in
torch.chunk's way over the processes that saved it (FSDP2's rows of a parameter; a left
projection's column shares of its low-rank moments). A tensor cut along `dim` over N
processes is cut over M by taking, for each new process, the overlap of its new range with
each saved part (read from memory-mapped files), so no process holds more than its share.
The model's FSDP2 keys are cut along rows; what an optimizer state tensor is, its optimizer
says (`state_layout`: the dimension or None), torch's AdamW's moments being rows.
"""

from __future__ import annotations

import torch

from .dtensor import is_sharded, span


def take(parts: list[torch.Tensor], dim: int, rank: int, world: int) -> torch.Tensor:
    """`rank`'s share (of `world`) of the tensor that `parts`, cut along `dim`, make up."""
    if len(parts) == 1 and world == 1:
        return parts[0]
    start, stop = span(sum(p.shape[dim] for p in parts), rank, world)
    pieces, at = [], 0
    for p in parts:
        lo, hi = max(start, at), min(stop, at + p.shape[dim])
        if lo < hi:
            pieces.append(p.narrow(dim, lo - at, hi - lo))
        at += p.shape[dim]
    if not pieces:  # a process with no rows of this tensor
        return parts[0].narrow(dim, 0, 0).clone()
    return torch.cat(pieces, dim)  # a copy: not a view into a memory-mapped file


def model_state(model: torch.nn.Module | None, sources: list[dict], rank: int, world: int) -> dict:
    """The model entries this process loads: its rows of what it holds sharded, the rest whole
    (everything whole without a model: export's consolidation). `sources`: the saved payloads
    (one per saving process, or the one whole checkpoint)."""
    cut = set(sources[0].get("sharded_keys", ()))
    own = model.state_dict() if model is not None else {}
    out = {}
    for k, v in sources[0]["model"].items():
        parts = [s["model"][k] for s in sources] if k in cut else [v]
        out[k] = take(parts, 0, rank, world) if is_sharded(own.get(k)) else take(parts, 0, 0, 1)
    return out


def optimizer_state(optimizer, saved: list[dict], rank: int, world: int) -> dict:
    """The optimizer state dict this process loads, from the state dicts the saving processes
    wrote (one whole one from a single process or DDP)."""
    if "chain" in saved[0]:  # optim.chain.OptimizerChain: each optimizer its own
        return {
            "chain": [
                optimizer_state(o, [s["chain"][i] for s in saved], rank, world)
                for i, o in enumerate(optimizer.optimizers)
            ]
        }
    groups = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    layout = getattr(optimizer, "state_layout", _rows)
    state = {}
    for idx, st in saved[0]["state"].items():
        p, group = groups[int(idx)]
        out = {}
        for key, v in st.items():
            dim = layout(p, group, key, st) if torch.is_tensor(v) else None
            if dim is None:
                out[key] = v
            else:
                out[key] = take([_plain(s["state"][idx][key]) for s in saved], dim, rank, world)
        state[idx] = out
    return {"state": state, "param_groups": saved[0]["param_groups"]}


def _rows(p: torch.Tensor, group: dict, key: str, state: dict) -> int | None:
    """torch's AdamW (and LocalAdamW): moments shaped like the parameter, a scalar step."""
    return 0 if state[key].dim() >= 1 and key != "step" else None


def _plain(v: torch.Tensor) -> torch.Tensor:
    """An 8-bit moment as float (the optimizer quantizes it again at its next update)."""
    return v.dequantize() if hasattr(v, "codes") and hasattr(v, "dequantize") else v
