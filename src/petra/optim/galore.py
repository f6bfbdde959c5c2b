"""GaLore optimizers: AdamW, 8-bit AdamW and Adafactor run in a low-rank gradient subspace.

Drop-in `torch.optim.Optimizer`s. A param group holding `rank` gets the low-rank treatment
for its 2-D parameters; every other parameter gets the plain optimizer. Per-step math:

    R = project(G)                 # (r, n), (m, r) or (r, r), from a basis refreshed every
                                   # update_proj_gap steps (svd | randomized | subspace)
    N = inner_update(R)            # Adam / Adafactor direction, state in the low-rank shape
    W -= lr * scale * back(N)      # plus decoupled weight decay W *= 1 - lr * wd

State holds tensors only (bases included), so state_dict() round-trips exactly. The split
into `project_grad` and `apply_update` is what layer-wise training uses to clip exactly.

`step()` updates the low-rank matrices of one shape together, as one stack (`_shape_batches`):
a few batched kernels instead of several operations per matrix, the same numbers.

`step(found_inf=...)` skips a step whose gradient is not finite without a host sync, as
torch's fused AdamW does: every write to the weights and the state is made a no-op on the
device by its coefficients, and the host's step counts are put back at the next step, once
the flag has reached the host by an asynchronous copy. A sync would make the host wait for
backward before it issues the update's few kernels per matrix, which then no longer overlap
the GPU's backward. The first update and refreshes that rotate or reset the moments still
decide on the host: they create or rewrite state that the device cannot put back cheaply.

Under FSDP2 a parameter is a DTensor whose rows are split over processes, and so is its
gradient G. The optimizer works on the local rows and no process holds a whole moment:
- right projection (Q, n x r, held by every rank): R_i = G_i Q and W_i += D_i Q^T are local;
- left projection (P, m x r, held by every rank): R = sum_i P_i^T G_i is one all-reduce of
  an (r, n) matrix; each rank keeps the moments of its share of R's columns and the updates
  are all-gathered before W_i += P_i D;
- a refresh runs the projector on `rowsharded.RowSharded`: only thin matrices travel.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from ..dtensor import is_sharded, local
from ..int8weights import Int8Weight
from .functional import (
    adafactor_direction,
    adam_denominators,
    adam_moments_,
    add_back_,
    back_project,
    channel_scales,
    fused_scaled_step_,
    project,
    scaled_step_,
    sides,
)
from .projector import Dense, compute_basis, gaussian_basis
from .rowsharded import RowSharded, Split, row_shards, sharded_channel_scales
from .skipped import SkippedSteps

PROJ_TYPES = ("std", "left", "right", "full")
PROJECTORS = ("svd", "randomized", "subspace", "random")
SWITCH_STATES = ("keep", "reproject", "reset")
# how the low-rank direction D (the inner optimizer's output for R = P^T G) becomes an update:
# galore: W -= lr * scale * P D; apollo: W -= lr * scale * G * s with s = |D| / |R| per
# channel (or per tensor), limited; fira: W -= lr * scale * (P D + limited s * (G - P R))
UPDATES = ("galore", "apollo", "fira")
SCALE_TYPES = ("channel", "tensor")
LOWRANK_DEFAULTS: dict[str, Any] = dict(
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    projector="subspace",
    switch_state="keep",
    proj_dtype="param",
    update="galore",
    scale_type="channel",
    norm_growth_limit=1.01,
    stagger_refresh=False,  # each matrix refreshes at its own step of the gap (galore-torch: all at once)
)
GROUP_EXTRAS = ("params", "name", "initial_lr", "rank")


def _validate_group(group: dict, allowed: Iterable[str]) -> None:
    allowed = set(allowed) | set(GROUP_EXTRAS) | set(LOWRANK_DEFAULTS)
    unknown = sorted(set(group) - allowed)
    if unknown:
        raise ValueError(f"unknown param group key(s) {unknown}; allowed keys: {sorted(allowed)}")
    if group.get("convention", "torch") not in CONVENTIONS:
        raise ValueError(f"convention={group['convention']!r} is not allowed; choose one of {', '.join(CONVENTIONS)}")
    if "rank" not in group or group["rank"] is None:
        return
    r, gap = group["rank"], group.get("update_proj_gap", LOWRANK_DEFAULTS["update_proj_gap"])
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"rank={r!r} must be an integer >= 1")
    if not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_proj_gap={gap!r} must be an integer >= 1")
    for key, allowed_vals in (
        ("proj_type", PROJ_TYPES),
        ("projector", PROJECTORS),
        ("switch_state", SWITCH_STATES),
        ("proj_dtype", ("param", "float32", "bfloat16")),
        ("update", UPDATES),
        ("scale_type", SCALE_TYPES),
    ):
        v = group.get(key, LOWRANK_DEFAULTS[key])
        if v not in allowed_vals:
            raise ValueError(f"{key}={v!r} is not allowed; choose one of {', '.join(allowed_vals)}")
    if group.get("update", "galore") != "galore" and group.get("proj_type", "std") == "full":
        raise ValueError(f"update={group['update']!r} scales channels of one side; use proj_type std, left or right")
    for p in group["params"]:
        if p.dim() == 2 and r > min(p.shape) and group.get("proj_type", "std") != "full":
            raise ValueError(
                f"rank={r} exceeds the smaller side of a {tuple(p.shape)} parameter; "
                f"use rank <= {min(p.shape)} or proj_type='full'"
            )


class GaLoreOptimizer(Optimizer):
    """Shared low-rank machinery; subclasses give the inner update in the projected space."""

    inner_keys: tuple[str, ...] = ()
    moment_keys = ("exp_avg", "exp_avg_sq")  # state tensors shaped like the (projected) gradient
    row_split = True  # the inner update is element-wise: a parameter may be updated in row blocks
    chunk_elements = 1 << 24  # parameters updated together hold at most this many gradient elements
    # step() updates low-rank matrices of one shape as one stack (see _shape_batches); the
    # stacked weights and gradients of a batch hold at most this many elements each
    stacks = False
    stack_elements = 1 << 26
    # the plain group's vectors alike (the norms) also update as one stack, where their
    # moments stay plain tensors whatever their number (not 8-bit's: a stack would quantize)
    stacks_vectors = False
    # the device types where APOLLO's and Fira's full-size element-wise update runs compiled
    # (fused kernels instead of about ten passes); elsewhere the same math runs op by op. None
    # by default: on the GPU it is measured for APOLLO only, and its tests there failed on
    # torch 2.11 (docs/benchmarks.md, thirteenth session); ("cuda",) turns it on
    fuses_update: tuple[str, ...] = ()
    lowrank_defaults = LOWRANK_DEFAULTS  # what a group holding `rank` gets unless it says otherwise
    takes_found_inf = True  # step(found_inf=...) skips on the device

    def __init__(self, params, defaults: dict):
        self._skips = SkippedSteps(("step", "moment_step"))  # steps skipped or not, known on the device only
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _validate_group(param_group, self.inner_keys)
        if param_group.get("rank") is not None:
            for k, v in self.lowrank_defaults.items():
                param_group.setdefault(k, v)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but each state tensor keeps its saved dtype and the step counters
        stay on the CPU: torch casts floating state to the parameter's dtype, which would
        turn fp32 moments and step counts of a bf16 model into bf16 on resume."""
        super().load_state_dict(state_dict)
        self._skips.clear()
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            p = params[idx]
            for k, v in saved.items():
                if torch.is_tensor(v):
                    self.state[p][k] = v.clone() if k in ("step", "moment_step") else v.to(device=p.device)

    def state_dict(self) -> dict:
        self._skips.settle()
        return super().state_dict()

    # -- projection --------------------------------------------------------------------
    def _refresh(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, shards, ok=None) -> None:
        """New bases for p from its gradient g. With `ok` (0-d bool, False = a skipped step)
        the bases change only if it is True, decided on the device; the skipped step's retry
        refreshes again (its step count is put back)."""
        # the side is chosen at the first refresh and kept: a state saved by an earlier
        # version (squares from the left) resumes as it was saved
        left, right = (
            ("P" in state, "Q" in state) if ("P" in state or "Q" in state) else sides(p.shape, group["proj_type"])
        )
        r = group["rank"]
        # "param": the parameter's dtype (bf16 in bf16 training, as galore-torch keeps it)
        dtype = {"param": p.dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[group["proj_dtype"]]
        # a deterministic per-(parameter, step) seed keeps randomized refreshes resumable
        seed = (int(state["step"]) * 1_000_003 + state["index"]) % (2**62)
        gen = torch.Generator(device=g.device).manual_seed(seed)
        old = {k: state[k] for k in ("P", "Q") if k in state}
        if ok is not None:  # a finite stand-in for a skipped step's gradient
            g = torch.where(ok, g, 0)
        new = {}
        if group["projector"] == "random":  # APOLLO: the gradient plays no part
            for key, on, side in (("P", left, p.shape[0]), ("Q", right, p.shape[1])):
                if on:
                    new[key] = gaussian_basis(side, min(r, side), g.device, gen).to(dtype)
        else:
            op = Dense(g) if shards is None else RowSharded(g, shards, p.shape[1])
            finite = ok is not None
            if left:
                basis = compute_basis(op, min(r, p.shape[0]), group["projector"], old.get("P"), gen, finite)
                new["P"] = basis.to(dtype)
            if right:
                basis = compute_basis(op.t(), min(r, p.shape[1]), group["projector"], old.get("Q"), gen, finite)
                new["Q"] = basis.to(dtype)
        for key, basis in new.items():
            state[key] = basis if ok is None else torch.where(ok, basis, old[key])
        if (
            old
            and group["projector"] != "random"
            and any(k in state for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row"))
        ):
            self._switch_state(state, old, group["switch_state"])

    def _switch_state(self, state: dict, old: dict, mode: str) -> None:
        if mode == "keep":
            return
        if mode == "reset":
            self._reset_moments(state)
            return
        # reproject: rotate the first moment into the new basis; the second moment (a
        # per-coordinate variance) goes through the element-wise square of the rotation
        # (Adafactor's factored second moment has no such rotation and is kept)
        for key, square in (("exp_avg", False), ("exp_avg_sq", True)):
            if key not in state:
                continue
            x = self._dequant(state, key)
            if "P" in old:
                c = state["P"].float().t() @ old["P"].float()  # (r_new, r_old)
                x = (c * c if square else c) @ x
            if "Q" in old:
                c = state["Q"].float().t() @ old["Q"].float()
                x = x @ (c * c if square else c).t()
            self._store(state, key, x)

    def project(self, g: torch.Tensor, state: dict, shards=None) -> torch.Tensor:
        P, Q = state.get("P"), state.get("Q")
        if shards is None:
            return project(g, P, Q)
        if P is not None:  # R = sum_i P_i^T G_i, then this rank's columns of it (a stack: of each)
            g = shards.sum(shards.rows(P).to(g.dtype).mT @ g)
        g = project(g, None, Q)
        return g[..., shards.columns(g.shape[-1])] if P is not None else g

    def _lowrank(self, p: torch.Tensor, group: dict) -> bool:
        return group.get("rank") is not None and p.dim() == 2

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["moment_step"] = torch.zeros((), dtype=torch.float32)
            # position of p among all params: seeds randomized refreshes reproducibly
            state["index"] = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
        return state

    @torch.no_grad()
    def project_grad(self, p: torch.Tensor, group: dict, ok: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient in the space the inner optimizer sees (refreshing the basis when due;
        `ok` as for `_refresh`)."""
        self._skips.settle(current=ok)
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("GaLore optimizers do not support sparse gradients")
        g = local(g)
        if not self._lowrank(p, group):
            return g
        state = self._state(p)
        shards = row_shards(p)
        self._prepare_basis(p, g, state, group, shards, ok)
        return self.project(g, state, shards)

    def _prepare_basis(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, shards, ok) -> None:
        """p's first basis, or a new one when its refresh is due (`ok` as for `_refresh`)."""
        if "P" not in state and "Q" not in state:
            state["offset"] = self._refresh_offset(p, group)
            self._refresh(p, g, state, group, shards)
        elif self._refresh_due(state, group):
            self._refresh(p, g, state, group, shards, ok)

    def _refresh_due(self, state: dict, group: dict) -> bool:
        return int(state["step"]) % group["update_proj_gap"] == state.get("offset", 0)

    def _decides_on_host(self, p: torch.Tensor, group: dict) -> bool:
        """Whether p's next update creates state or rewrites its moments (its first update;
        a refresh with switch_state reproject or reset): a skip of it is decided on the host."""
        state = self.state.get(p)
        if not state:
            return True
        if not self._lowrank(p, group):
            return False
        if "P" not in state and "Q" not in state:
            return True
        return group["switch_state"] != "keep" and self._refresh_due(state, group)

    def _refresh_offset(self, p: torch.Tensor, group: dict) -> int:
        """The step of each update_proj_gap cycle at which p refreshes its basis: 0 for all
        (galore-torch), or with stagger_refresh the low-rank matrices spread evenly over the
        cycle in parameter order, so a step pays for about n / gap refreshes, not n every gap
        steps. Kept in the state: a resumed run refreshes on the same steps."""
        if not group["stagger_refresh"]:
            return 0
        low = [q for g in self.param_groups for q in g["params"] if self._lowrank(q, g)]
        k = next(i for i, q in enumerate(low) if q is p)
        return k * group["update_proj_gap"] // len(low)

    @torch.no_grad()
    def apply_update(self, p: torch.Tensor, r: torch.Tensor, group: dict, coef: float = 1.0) -> None:
        """One optimizer update of p from its (projected) gradient r, scaled by coef (clipping)."""
        self.apply_updates([p], [r], group, coef)

    @torch.no_grad()
    def apply_updates(
        self,
        params: list[torch.Tensor],
        rs: list[torch.Tensor],
        group: dict,
        coef: float | torch.Tensor = 1.0,
        ok: torch.Tensor | None = None,
    ) -> None:
        """Update a list of parameters of one group from their (projected) gradients, scaled
        by coef (a float or a 0-d tensor). With `ok` (a 0-d bool tensor) the update happens
        only if it is True, decided on the device (see the module docstring).

        Low-rank matrices alike update as one stack (`_shape_batches`; layer-wise updates
        come here with their projected gradients). The others' element-wise math runs as a
        few multi-tensor (foreach) kernels per piece of the list; each low-rank parameter
        among them then costs one fused `addmm_` (back-projection + add).
        """
        if not params:
            return
        batches, rest = self._shape_batches(params, group, ok, rs)
        for batch in batches:
            self._update_stack([params[i] for i in batch], group, ok, [rs[i] for i in batch], coef)
        params, rs = [params[i] for i in rest], [rs[i] for i in rest]
        if not params:
            return
        states = [self._state(p) for p in params]
        self._advance(states, ok)
        self._init_moments(rs, states)
        params, rs, states, stacks = self._stack_vectors(params, rs, states, group)
        for piece in self._pieces(params, rs, states, group):
            self._update_piece(*piece, group, coef, ok)
        for stack in stacks:  # the stacked vectors back in their own tensors
            self._unstack(*stack)

    def _stack_vectors(self, params, rs, states, group: dict):
        """(params, rs, states) with the plain group's vectors alike (shape, dtypes, moment
        step: a model's RMSNorm weights, two a layer) replaced by one stack each, and the
        stacks to copy back: one at a time, each vector costs casts and selections of its
        own on the host (docs/benchmarks.md, twelfth session). Element for element the math
        of one at a time."""
        if not self.stacks_vectors or group.get("rank") is not None:
            return params, rs, states, []
        by_key: dict[tuple, list[int]] = {}
        for i, (p, r, st) in enumerate(zip(params, rs, states)):
            if p.dim() == 1 and not is_sharded(p) and not r.is_sparse and self._stackable(st):
                by_key.setdefault((p.shape, p.dtype, r.dtype, float(st["moment_step"])), []).append(i)
        batches = [batch for batch in by_key.values() if len(batch) > 1]
        done = {i for batch in batches for i in batch}
        keep = [i for i in range(len(params)) if i not in done]
        out = ([params[i] for i in keep], [rs[i] for i in keep], [states[i] for i in keep], [])
        for batch in batches:
            members = [states[i] for i in batch]
            stack = self._stacked_state(members)
            ws = [local(params[i]) for i in batch]
            w = torch.stack(ws)
            out[0].append(w)
            out[1].append(torch.stack([rs[i] for i in batch]))
            out[2].append(stack)
            out[3].append((w, ws, stack, members))
        return out

    def _advance(self, states: list[dict], ok: torch.Tensor | None) -> None:
        """Count an update in each state (one host op for all: these are CPU tensors)."""
        torch._foreach_add_([st["step"] for st in states], 1)
        torch._foreach_add_([st["moment_step"] for st in states], 1)
        if ok is not None:
            self._skips.record(ok, states)

    def _shape_batches(self, params: list[torch.Tensor], group: dict, ok, rs=None) -> tuple[list[list[int]], list[int]]:
        """(batches, the rest), as indices into params: the low-rank matrices of one shape,
        side and moment step update as one stack (one batched projection, one set of
        element-wise kernels, one baddbmm back): one at a time, each matrix costs several
        host-side operations, and small models then wait on the host (docs/benchmarks.md,
        seventh session). Without `rs` (the projected gradients, which layer-wise updates
        bring) due refreshes happen here, one matrix at a time. The first update (which
        creates the state) goes one at a time. FSDP2 shards stack too: their local rows
        (right projections: R_i = G_i Q is this rank's own) or their shares of R's columns
        (left projections: one all-reduce of the stack's R)."""
        if not (self.stacks and group.get("rank") is not None):
            return [], list(range(len(params)))
        scaled = group["update"] != "galore"  # APOLLO and Fira also read the full gradient
        by_key: dict[tuple, list[int]] = {}
        rest = []
        for i, p in enumerate(params):
            st = self.state.get(p)
            g = p.grad if rs is None else rs[i]
            if not (
                st
                and self._stackable(st)
                and self._lowrank(p, group)
                and not isinstance(p, Int8Weight)  # its writes round: one per matrix, from fp32
                and g is not None
                and not g.is_sparse
                and not (scaled and p.grad is None)  # (the error is one matrix's, below)
                and not (rs is None and self._decides_on_host(p, group))  # a refresh that resets moments
            ):
                rest.append(i)
                continue
            # what a due refresh (switch_state keep, done below) leaves as it is
            bases = tuple((k, st[k].shape, st[k].dtype) for k in ("P", "Q") if k in st)
            key = (p.shape, p.dtype, g.shape, g.dtype, bases, float(st["moment_step"]), "update_norm" in st)
            by_key.setdefault(key, []).append(i)
        batches = []
        for idx in by_key.values():
            per = max(1, self.stack_elements // params[idx[0]].numel())
            for batch in (idx[i : i + per] for i in range(0, len(idx), per)):
                if len(batch) == 1:  # a stack of one would only add copies
                    rest += batch
                    continue
                batches.append(batch)
                if rs is None:  # due refreshes, now that the matrix is known to stack
                    for i in batch:
                        p = params[i]
                        self._prepare_basis(p, local(p.grad), self.state[p], group, row_shards(p), ok)
        return batches, sorted(rest)

    def _update_stack(self, params: list[torch.Tensor], group: dict, ok, rs=None, coef=1.0) -> None:
        """The update of matrices alike (see _shape_batches) as one: weights, gradients (or
        the projected ones, `rs`), bases and moments stacked, updated by `_update_piece` as
        one 3-D parameter, then copied back. Element for element the math of one matrix at a
        time. FSDP2 shards stack this rank's rows (and, projected from the left, its shares of
        R's columns); what spans a whole matrix (R = sum_i P_i^T G_i, APOLLO-Mini's scale,
        Fira's limiter, the gathered columns) is one collective for the stack."""
        states = [self.state[p] for p in params]
        self._advance(states, ok)
        stack = self._stacked_state(states)
        stack.update({k: torch.stack([st[k] for st in states]) for k in ("P", "Q") if k in states[0]})
        if "update_norm" in states[0]:  # APOLLO's and Fira's limiter: one norm per matrix
            stack["update_norm"] = torch.stack([st["update_norm"] for st in states])
        ws = [local(p) for p in params]
        w = torch.stack(ws)  # (step() runs without autograd)
        g = torch.stack([local(p.grad) for p in params]) if rs is None or group["update"] != "galore" else None
        shards = row_shards(params[0])
        r = self.project(g, stack, shards) if rs is None else torch.stack(rs)
        self._update_piece([w], [r], [stack], group, coef, ok, stacked=True, grads=[g], shards=shards)
        self._unstack(w, ws, stack, states)
        if "update_norm" in stack:
            for st, norm in zip(states, stack["update_norm"].unbind(0)):
                st["update_norm"] = norm

    def _stacked_state(self, states: list[dict]) -> dict:
        """The moments of tensors alike stacked, with their (common) moment step."""
        stack = {k: self._stack_moments([st[k] for st in states]) for k in self.moment_keys}
        stack["moment_step"] = states[0]["moment_step"]
        return stack

    def _unstack(self, w: torch.Tensor, ws: list[torch.Tensor], stack: dict, states: list[dict]) -> None:
        """A stack's updated weights and moments back into the tensors it was made of."""
        torch._foreach_copy_(ws, list(w.unbind(0)))
        for k in self.moment_keys:
            self._unstack_moments(stack[k], [st[k] for st in states])

    def _stackable(self, state: dict) -> bool:
        """Whether a low-rank matrix with this state can update in a stack: it has moments."""
        return "exp_avg" in state

    def _stack_moments(self, moments: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(moments)

    def _unstack_moments(self, stacked: torch.Tensor, moments: list[torch.Tensor]) -> None:
        torch._foreach_copy_(moments, list(stacked.unbind(0)))

    def _pieces(self, params, rs, states, group):
        """(params, rs, states) in pieces of at most chunk_elements gradient elements, so that
        the fp32 working copies of gradients and moments exist for one piece at a time (all at
        once they were 25 GB at 7b in layer-wise mode). A larger parameter that is updated
        element-wise (no projection) is split into row blocks: views of the parameter, its
        gradient and its moments (so the 7b embedding's update needs no fp32 copy of it all)."""
        piece: tuple[list, list, list] = ([], [], [])
        size = 0
        for p, r, st in zip(params, rs, states):
            if (
                r.numel() > self.chunk_elements
                and self.row_split
                and not self._lowrank(p, group)
                and not isinstance(p, Int8Weight)  # a row block of it would be a copy
            ):
                if piece[0]:
                    yield piece
                    piece, size = ([], [], []), 0
                row = math.prod(r.shape[1:])
                # whole 8-bit blocks per row block: a multiple of 256 rows is always aligned
                rows = max(256, self.chunk_elements // row // 256 * 256)
                lp = local(p)
                for i in range(0, r.shape[0], rows):
                    part = {k: v[i : i + rows] if k in self.moment_keys else v for k, v in st.items()}
                    yield [lp[i : i + rows]], [r[i : i + rows]], [part]
                continue
            if piece[0] and size + r.numel() > self.chunk_elements:
                yield piece
                piece, size = ([], [], []), 0
            piece[0].append(p)
            piece[1].append(r)
            piece[2].append(st)
            size += r.numel()
        if piece[0]:
            yield piece

    def _update_piece(
        self, params, rs, states, group, coef, ok, stacked: bool = False, grads=None, shards=None
    ) -> None:
        """The update of a piece of parameters (`stacked`: one 3-D stack of matrices alike,
        with `grads` their stacked gradients and `shards` the row split of FSDP2 shards)."""
        rs = [r.float() for r in rs]
        if torch.is_tensor(coef) or coef != 1.0:
            torch._foreach_mul_(rs, coef)
        if ok is not None:  # a skipped step computes on zeros; the writes below are no-ops
            rs = [torch.where(ok, r, 0.0) for r in rs]
        splits = None
        if self.sharded_inner and any(is_sharded(p) for p in params):
            splits = [self._split(p, st, group) for p, st in zip(params, states)]
        nums, dens, divs = self._inner(rs, states, group, ok, splits)
        lr = group["lr"]
        owners, params = params, [local(p) for p in params]  # FSDP2: update this rank's rows
        decay_after = group.get("convention", "torch") == "galore-torch"
        decay = 1 - lr * group["weight_decay"]
        if ok is not None:
            okf = ok.float()
            if group["weight_decay"]:
                decay = torch.where(ok, decay, 1.0)
        if group["weight_decay"] and not decay_after:
            torch._foreach_mul_(params, decay)
        is_low = [stacked or self._lowrank(p, group) for p in params]
        low = [i for i, on in enumerate(is_low) if on]
        dense = [i for i, on in enumerate(is_low) if not on]
        if dense:
            ps = [params[i] for i in dense]
            ns = [nums[i].to(params[i].dtype) for i in dense]
            if dens is not None:  # exactly torch.optim.AdamW's addcdiv
                ds = [dens[i].to(params[i].dtype) for i in dense]
                if ok is not None:  # (the numerators are the moments) a skip divides by infinity
                    torch._foreach_div_(ds, okf)
                torch._foreach_addcdiv_(ps, ns, ds, [-lr / divs[i] for i in dense])
            else:
                if ok is not None:
                    torch._foreach_mul_(ns, okf)
                torch._foreach_mul_(ns, [-lr / divs[i] for i in dense])
                torch._foreach_add_(ps, ns)
        if low:
            low_nums = [nums[i] for i in low]
            dirs = (
                torch._foreach_div(low_nums, [dens[i] for i in low])
                if dens is not None
                else [n.clone() for n in low_nums]
            )
            torch._foreach_div_(dirs, [divs[i] for i in low])
            if ok is not None:
                torch._foreach_mul_(dirs, okf)
            for d, i in zip(dirs, low):
                g = grads[i] if grads is not None else None
                self._apply_lowrank(params[i], owners[i], d, rs[i], states[i], group, coef, ok, g, shards)
        if group["weight_decay"] and decay_after:
            torch._foreach_mul_(params, decay)

    def _apply_lowrank(self, p, owner, d, r, state: dict, group: dict, coef, ok, g=None, stack_shards=None) -> None:
        """p's update from its low-rank direction d (the inner optimizer's output for the
        projected gradient r), in the way the group's `update` says:

        - galore: W -= lr * a * P d
        - apollo: W -= lr * limited(a * G * s), s = |d| / |r| per channel (or per tensor)
        - fira:   W -= lr * (a * P d + limited((G - a * P r) * s))

        with a the group's scale. Fira subtracts a * P r, not P r, as the fira package does
        (its published runs use a = 0.25); with a = 1 the residual is the paper's G - P P^T G.
        The packages' APOLLO `scale` is a^2 (APOLLO-Mini's 128 is a = sqrt(128)).

        For a stack (`_update_stack`) p, d, r, P and Q are 3-D, g is the stacked gradient and
        the limiter's norms are one per matrix; `stack_shards` is the row split of a stack of
        FSDP2 shards."""
        a = group["scale"]
        # under FSDP2: g is this rank's rows; r and d its columns (left) or rows
        shards = row_shards(owner) if stack_shards is None else stack_shards
        if group["update"] == "galore":
            self._add_back(p, d.mul_(-group["lr"] * a), state, shards)
            return
        if g is None and owner.grad is None:
            raise RuntimeError(
                f"update={group['update']!r} scales the full gradient, which is gone: layer-wise "
                "updates with clipping keep only the projected gradient; use grad_clip=0 with layer-wise"
            )
        g = local(owner.grad) if g is None else g
        P, Q = state.get("P"), state.get("Q")
        tensor_wise = group["scale_type"] == "tensor"
        if shards is None:
            s = channel_scales(d, r, -2 if P is not None else -1, tensor_wise)
        else:
            s = sharded_channel_scales(d, r, P is not None, tensor_wise, shards, owner.shape[-1])
        t = float(state["moment_step"])
        b1, b2 = group.get("betas", (0.0, 0.0))
        unit = math.sqrt(1 - b2**t) / (1 - b1**t)  # Adam's bias correction (1 without betas)
        previous = state.get("update_norm")
        if P is not None and shards is not None:  # the residual and back-projection need every column
            n = self._width(owner, state)
            r, d, P = shards.gather_columns(r, n), shards.gather_columns(d, n), shards.rows(P)
        # Fira's back-projections run in the gradient's dtype (bf16 in bf16 training, as the
        # fira package computes them), added into the fp32 update
        fira = group["update"] == "fira"
        residual = back_project(r * -a, P, Q, g.dtype) if fira else None  # the part of G outside the subspace
        back = back_project(d * a, P, Q, g.dtype) if fira else None
        w = local(p)
        args = (w, g, s if fira else s * a, group["lr"], group["norm_growth_limit"], unit, coef, ok, residual, back)
        if w.device.type in self.fuses_update and shards is None:
            state["update_norm"] = fused_scaled_step_(*args, previous)
        else:
            state["update_norm"] = scaled_step_(*args, previous, shards)

    def _add_back(self, p: torch.Tensor, d: torch.Tensor, state: dict, shards=None) -> None:
        """p += back-projection of the low-rank update d (one fused addmm where possible)."""
        P, Q = state.get("P"), state.get("Q")
        if shards is not None and P is not None:  # gather the column shares; this rank's rows of P
            d = shards.gather_columns(d.to(p.dtype), self._width(p, state))
            P = shards.rows(P)
        add_back_(p, d, P, Q)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        """One update of every parameter with a gradient. With `found_inf` (a 0-d tensor,
        non-zero = skip, as torch's fused optimizers take it) the step is skipped, step
        counts included, on the device where it can be (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._skips.settle()
        ok = None
        if found_inf is not None:
            if any(self._decides_on_host(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None):
                if bool(found_inf):
                    return loss
            else:
                ok = found_inf == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            batches, rest = self._shape_batches(params, group, ok)
            for batch in batches:
                self._update_stack([params[i] for i in batch], group, ok)
            rest = [params[i] for i in rest]
            self.apply_updates(rest, [self.project_grad(p, group, ok) for p in rest], group, ok=ok)
        return loss

    # -- state storage (moment_dtype here; 8-bit in adam8bit.py) ------------------------------
    # Moments in bf16 are computed in fp32 and rounded once per update (the packages that keep
    # bf16 state compute in bf16).
    moment_dtype = torch.float32

    def _store(self, state: dict, key: str, value: torch.Tensor) -> None:
        state[key] = value.to(self.moment_dtype)

    def _dequant(self, state: dict, key: str) -> torch.Tensor:
        return state[key].float()

    def _zeros(self, state: dict, key: str, like: torch.Tensor) -> None:
        """A new all-zero moment shaped like `like`."""
        state[key] = torch.zeros_like(like, dtype=self.moment_dtype)

    def _init_moments(self, rs: list[torch.Tensor], states: list[dict]) -> None:
        """Creates missing moments before an update (Adafactor creates its own in `_inner`)."""

    def _reset_moments(self, state: dict) -> None:
        state["moment_step"].zero_()
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            if k in state:
                self._zeros(state, k, state[k])

    sharded_inner = False  # whether _inner needs to know how each r is cut over FSDP2's ranks

    def _cut(self, p: torch.Tensor, group: dict, state: dict) -> int:
        """The dimension along which FSDP2's processes hold shares of p's projected gradient
        (see `project`): a left projection's columns (1), otherwise rows (0: a right
        projection's, or the gradient's own)."""
        return 1 if self._lowrank(p, group) and "P" in state else 0

    def state_layout(self, p: torch.Tensor, group: dict, key: str, state: dict) -> int | None:
        """The dimension along which FSDP2's processes hold shares of state[key] (None: every
        process holds it whole), for checkpoints that reshard: the moments are cut as the
        projected gradient is (`_cut`); the bases, step counts and the limiter's norm are
        whole. Of Adafactor's factors, the one along the cut dimension is cut (its only one)."""
        cut = self._cut(p, group, state)
        if key in ("exp_avg", "exp_avg_sq"):
            return cut
        if key == "exp_avg_sq_row":
            return 0 if cut == 0 else None
        if key == "exp_avg_sq_col":
            return 0 if cut == 1 else None
        return None

    def _split(self, p: torch.Tensor, state: dict, group: dict) -> Split | None:
        """How this rank's projected gradient of p is cut (`_cut`), for the inner update."""
        shards = row_shards(p)
        if shards is None:
            return None
        if self._cut(p, group, state) == 1:
            return Split(shards, 1, self._width(p, state))
        return Split(shards, 0, p.shape[0])

    @staticmethod
    def _width(p: torch.Tensor, state: dict) -> int:
        """The columns of p's projected gradient (of each matrix of a stack): Q's rank, or
        p's own columns."""
        Q = state.get("Q")
        return Q.shape[-1] if Q is not None else p.shape[-1]

    def _inner(
        self, rs: list[torch.Tensor], states: list[dict], group: dict, ok: torch.Tensor | None = None, splits=None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[float]]:
        """(numerators, denominators or None, divisors): direction_i = num_i / den_i / div_i.
        With `ok` False (on the device) the state stays as it was and the rs are zeros.
        `splits` (with `sharded_inner`): how each r is cut over FSDP2's ranks, or None."""
        raise NotImplementedError


CONVENTIONS = ("torch", "galore-torch")
ADAFACTOR_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW in the projected space. Groups without `rank` match torch.optim.AdamW.

    Conventions. petra follows torch.optim.AdamW (convention="torch", the default):
    direction = m_hat / (sqrt(v_hat) + eps) with eps added after the bias correction of v,
    eps 1e-8, and decoupled weight decay applied before the update (W *= 1 - lr * wd, then
    W -= lr * direction). galore-torch (and transformers' old AdamW) put eps before the
    bias correction (m_hat / (sqrt(v) / sqrt(1 - b2^t) + eps / sqrt(1 - b2^t))), default
    eps 1e-6, and decay the weights after the update. `convention="galore-torch"` with
    `eps=1e-6` reproduces galore-torch's GaLoreAdamW update (tested against the package).
    The two differ by eps only in the first few hundred steps, where sqrt(1 - b2^t) < 1,
    and by weight decay in the order of its O(lr^2) term.
    """

    inner_keys = ("lr", "betas", "eps", "weight_decay", "convention")
    stacks = True
    stacks_vectors = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        convention: str = "torch",
        moment_dtype: torch.dtype = torch.float32,
    ):
        self.moment_dtype = moment_dtype
        if lr is None or lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        if convention not in CONVENTIONS:
            raise ValueError(f"convention={convention!r} is not allowed; choose one of {', '.join(CONVENTIONS)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, convention=convention))

    def _eps(self, group: dict, t: float) -> float:
        """eps as added after the bias correction of v (galore-torch adds it before)."""
        if group.get("convention", "torch") == "galore-torch":
            return group["eps"] / math.sqrt(1 - group["betas"][1] ** t)
        return group["eps"]

    def _init_moments(self, rs, states) -> None:
        for st, r in zip(states, rs):
            if "exp_avg" not in st:
                self._zeros(st, "exp_avg", r)
                self._zeros(st, "exp_avg_sq", r)

    def _inner(self, rs, states, group, ok=None, splits=None):
        b1, b2 = group["betas"]
        ms = [self._dequant(st, "exp_avg") for st in states]
        vs = [self._dequant(st, "exp_avg_sq") for st in states]
        adam_moments_(ms, vs, rs, b1, b2, ok)
        for st, m, v in zip(states, ms, vs):
            self._store(st, "exp_avg", m)
            self._store(st, "exp_avg_sq", v)
        ts = [float(st["moment_step"]) for st in states]
        return ms, adam_denominators(vs, ts, b2, [self._eps(group, t) for t in ts]), [1 - b1**t for t in ts]


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor (Shazeer & Stern 2018) in the projected space, with a fixed learning rate
    (no relative step, no parameter scaling), as the GaLore paper runs it.

    Momentum convention: with beta1 set, petra averages the unscaled updates u and steps
    by lr * mean(u); transformers' Adafactor and galore-torch average lr * u. The two are
    identical while the learning rate is constant and differ during warm-up and decay
    (petra's momentum follows the current lr, theirs carries the lr of past steps)."""

    inner_keys = ("lr", "beta1", "eps", "clip_threshold", "decay_rate", "weight_decay")
    # the factored second moment needs whole rows and columns: no row blocks of a parameter;
    # across FSDP2's processes it sums its means over the ranks instead (`_split`)
    row_split = False
    sharded_inner = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta1: float | None = None,
        eps=(1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
    ):
        # transformers' Adafactor arguments are accepted so its call sites work; the
        # schedule-free options are refused by name rather than ignored
        for name, on in (
            ("relative_step", relative_step),
            ("scale_parameter", scale_parameter),
            ("warmup_init", warmup_init),
        ):
            if on:
                raise ValueError(
                    f"GaLoreAdafactor does not implement {name}=True: it runs with a fixed learning "
                    f"rate, as the GaLore paper does; pass lr (and a schedule) and {name}=False"
                )
        if lr is None or not lr >= 0:
            raise ValueError(
                f"GaLoreAdafactor needs a learning rate lr >= 0 (got {lr!r}); relative_step is not implemented"
            )
        if beta1 is not None and not 0 <= beta1 < 1:
            raise ValueError(f"beta1={beta1!r} must be None (no first moment) or in [0, 1)")
        if len(eps) != 2 or min(eps) < 0 or clip_threshold <= 0 or decay_rate >= 0 or weight_decay < 0:
            raise ValueError(
                f"invalid Adafactor hyperparameters eps={eps}, clip_threshold={clip_threshold}, "
                f"decay_rate={decay_rate} (must be < 0), weight_decay={weight_decay}"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                beta1=beta1,
                eps=eps,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                weight_decay=weight_decay,
            ),
        )

    def _inner(self, rs, states, group, ok=None, splits=None):
        splits = splits or [None] * len(rs)
        if ok is None:
            return [self._one(r, st, group, sp) for r, st, sp in zip(rs, states, splits)], None, [1.0] * len(rs)
        # the moments are small (factored, or low-rank): a skipped step selects the old ones
        okf, out = ok.float(), []
        for r, st, sp in zip(rs, states, splits):
            old = {k: st[k].clone() for k in ADAFACTOR_KEYS if k in st}
            out.append(self._one(r, st, group, sp))
            for k in ADAFACTOR_KEYS:
                if k in st:  # a moment created now was zeros before
                    st[k] = old.get(k, torch.zeros_like(st[k])).lerp_(st[k], okf)
        return out, None, [1.0] * len(rs)

    def _one(self, r, state, group, split=None):
        return adafactor_direction(
            r,
            state,
            float(state["moment_step"]),
            group["eps"],
            group["decay_rate"],
            group["clip_threshold"],
            group["beta1"],
            split,
        )
