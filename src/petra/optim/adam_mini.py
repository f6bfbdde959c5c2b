"""Adam-mini (Zhang et al. 2024, arXiv 2406.16793): Adam with one second-moment value per block
of weights instead of one per weight, with the partition of the adam-mini package (v1.1.1), its
reference in tests:

- query and key projections: one value per attention head (head_dim rows of the matrix);
- embeddings, head, value and output projections, MLP matrices: one per row (output neuron,
  or token);
- biases: one per weight (plain Adam);
- anything else (the norms): one for the whole tensor.

Norms and biases take no weight decay. The moments are kept in the parameter's dtype, as the
package keeps them.

`step(found_inf=...)` skips a step whose gradient is not finite on the device, with no host
sync: the gradient reads as zeros for the second moments (whose decay is then 1) and as the
first moment itself for its lerp, the update is multiplied by 0, and the step counts are put
back at the next step (`skipped.SkippedSteps`). The first step, which creates the state,
decides on the host.

Under FSDP2 (Shard(0): each rank holds some rows of every parameter) a row's block is its
rank's own; a head whose rows two ranks share, and a norm's one block, sum their squares over
the ranks (one all-reduce of n_heads values, or of one value, per parameter and step). The
package's per-head view of a local shard assumes that heads do not straddle ranks; here they
may.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ..dtensor import local
from .functional import adam_denominators
from .rowsharded import row_shards
from .skipped import SkippedSteps

HEAD_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ROW_NAMES = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value")
ROW_NAMES += ("o_proj", "wo", "attn.proj", "feed_forward", "linear", "mlp")


def block_kind(name: str) -> str:
    """adam (per weight), head, row or tensor: the package's partition by parameter name."""
    n = name.lower()
    if "bias" in n:
        return "adam"
    if any(k in n for k in HEAD_NAMES):
        return "head"
    if any(k in n for k in ROW_NAMES):
        return "row"
    return "tensor"


class AdamMini(Optimizer):
    """Adam-mini over named parameters; `head_dim` is the rows of one attention head."""

    def __init__(self, named_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, head_dim: int):
        groups = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            n = name.lower()
            decay = 0.0 if "norm" in n or "ln" in n or "bias" in n else weight_decay
            groups.append({"params": [p], "name": name, "kind": block_kind(name), "weight_decay": decay})
        self._skips = SkippedSteps()
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, head_dim=head_dim))

    def state_layout(self, p, group, key, state) -> int | None:
        """For checkpoints that reshard: the moments per weight and the second moments per row
        are FSDP2's rows; those per head or per tensor are whole."""
        if key in ("m", "v") or key == "vmean" and group["kind"] == "row":
            return 0
        return None

    # parameters updated together hold at most this many elements: the updates' temporaries
    # exist for one chunk at a time
    chunk_elements = 1 << 26
    takes_found_inf = True  # step(found_inf=...) skips on the device

    def state_dict(self) -> dict:
        self._skips.settle()
        return super().state_dict()

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        self._skips.settle()
        ok = None  # on the device: False skips the step
        if found_inf is not None:
            new = any(not self.state.get(g["params"][0]) for g in self.param_groups if g["params"][0].grad is not None)
            if new and bool(found_inf):  # the first step creates state: decided on the host
                return loss
            ok = None if new else found_inf == 0
        # the groups alike (hyperparameters and step count) update together, in multi-tensor
        # kernels: one parameter at a time, the host issuing a dozen small operations for
        # each of the model's tensors was the step's bottleneck (docs/benchmarks.md)
        alike: dict[tuple, list[dict]] = {}
        for group in self.param_groups:
            p = group["params"][0]
            if p.grad is None:
                continue
            step = self.state[p]["step"] if self.state.get(p) else 0
            key = (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"], step)
            alike.setdefault(key, []).append(group)
        for groups in alike.values():
            chunk, size = [], 0
            for group in groups:
                n = local(group["params"][0]).numel()
                if chunk and size + n > self.chunk_elements:
                    self._update(chunk, ok)
                    chunk, size = [], 0
                chunk.append(group)
                size += n
            if chunk:
                self._update(chunk, ok)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Also the state of the adam-mini package, which petra's adam-mini ran on before: its
        groups hold beta1 and beta2 (not betas, kind, head_dim), and its first moment of a
        query or key is a (heads, head_dim x n) view."""
        groups = state_dict["param_groups"]
        if groups and "beta1" in groups[0]:
            groups = [
                {
                    **{k: v for k, v in g.items() if k not in ("beta1", "beta2")},
                    "betas": (g["beta1"], g["beta2"]),
                    "kind": own["kind"],
                    "head_dim": own["head_dim"],
                }
                for g, own in zip(groups, self.param_groups)
            ]
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)
        self._skips.clear()
        for group in self.param_groups:
            p = group["params"][0]
            st = self.state.get(p)
            if st and st["m"].shape != local(p).shape:
                st["m"] = st["m"].reshape(local(p).shape)

    def _mean_square(self, p, g: torch.Tensor, kind: str, head_dim: int, shards, head_of) -> torch.Tensor:
        """This step's mean of g^2 over each block of p (g: this rank's rows of p's gradient;
        `head_of`: under FSDP2, the head of each of them)."""
        if kind == "row":
            return torch.mean(g * g, dim=1, keepdim=True)
        heads = p.shape[0] // head_dim
        if shards is None:
            if kind == "tensor":
                return torch.sum(g * g) / p.numel()
            return torch.mean((g * g).view(heads, -1), dim=1, keepdim=True)
        # sums over the ranks, in fp32
        if kind == "tensor":
            return (shards.sum(torch.sum(g.float() * g.float())) / p.numel()).to(g.dtype)
        sums = torch.zeros(heads, 1, dtype=torch.float32, device=g.device)
        sums.index_add_(0, head_of, (g.float() * g.float()).sum(1, keepdim=True))
        return (shards.sum(sums) / (head_dim * p.shape[1])).to(g.dtype)

    def _update(self, groups: list[dict], ok: torch.Tensor | None = None) -> None:
        """One update of the parameters of groups alike (same hyperparameters and step), with
        the package's operations element for element; only if `ok` (0-d bool) is True."""
        lr, eps, wd, (beta1, beta2) = groups[0]["lr"], groups[0]["eps"], groups[0]["weight_decay"], groups[0]["betas"]
        params = [g["params"][0] for g in groups]
        ws, gs = [local(p) for p in params], [local(p.grad) for p in params]
        if ok is not None:  # finite stand-ins: zeros for the second moments
            gs = [torch.where(ok, g, 0) for g in gs]
        adam, blocks = [], []  # indices: second moment per weight, or per block
        means, heads = [], []  # this step's mean squares per block; under FSDP2, each row's head
        for i, (p, g, group) in enumerate(zip(params, gs, groups)):
            state, kind = self.state[p], group["kind"]
            shards = row_shards(p)
            head_of = None  # under FSDP2, the head of each of this rank's rows
            if kind == "head" and shards is not None:
                head_of = torch.arange(shards.start, shards.stop, device=g.device) // group["head_dim"]
            if kind == "adam":
                adam.append(i)
                mean_square = None
            else:
                blocks.append(i)
                mean_square = self._mean_square(p, g, kind, group["head_dim"], shards, head_of)
            if not state:
                state["step"] = 0
                state["m"] = torch.zeros_like(g)
                state["v" if kind == "adam" else "vmean"] = torch.zeros_like(g if kind == "adam" else mean_square)
            means.append(mean_square)
            heads.append(head_of)
            state["step"] += 1
        states = [self.state[p] for p in params]
        if ok is not None:
            self._skips.record(ok, states)
        step = states[0]["step"]
        ms = [st["m"] for st in states]
        keep_or = (lambda x, one: x) if ok is None else (lambda x, one: torch.where(ok, x, one))
        if adam:
            vs = [states[i]["v"] for i in adam]
            torch._foreach_mul_(vs, keep_or(beta2, 1.0))
            torch._foreach_addcmul_(vs, [gs[i] for i in adam], [gs[i] for i in adam], value=1 - beta2)
        if blocks:
            vs = [states[i]["vmean"] for i in blocks]
            torch._foreach_mul_(vs, keep_or(beta2, 1.0))
            torch._foreach_add_(vs, [means[i] for i in blocks], alpha=1 - beta2)
        decayed = [w for w, group in zip(ws, groups) if group["weight_decay"] > 0.0]
        if decayed:
            torch._foreach_mul_(decayed, keep_or(1 - lr * wd, 1.0))
        # a skipped step moves m toward itself: it stays as it was, bit for bit
        torch._foreach_lerp_(ms, gs if ok is None else [torch.where(ok, g, m) for g, m in zip(gs, ms)], 1 - beta1)
        bias_correction_1 = 1 - beta1**step

        def denominators(vs):  # sqrt(v) / sqrt(1 - beta2^t) + eps, the package's operations
            return adam_denominators(vs, [step] * len(vs), beta2, [eps] * len(vs))

        if adam:
            hs = denominators([states[i]["v"] for i in adam])
            if ok is not None:  # a skipped step divides by infinity
                torch._foreach_div_(hs, ok.to(hs[0].dtype))
            torch._foreach_addcdiv_([ws[i] for i in adam], [ms[i] for i in adam], hs, value=-lr / bias_correction_1)
        if blocks:
            hs = denominators([states[i]["vmean"] for i in blocks])
            stepsizes = torch._foreach_reciprocal(hs)  # (1 / bc1) / h, as Python computes it
            torch._foreach_mul_(stepsizes, 1 / bias_correction_1)
            rows, factors = [], []
            for i, s in zip(blocks, stepsizes):
                m, head_of = ms[i], heads[i]
                if groups[i]["kind"] == "head" and head_of is None:  # each row takes its head's step size
                    rows.append(m.view(s.shape[0], -1))
                    factors.append(s)
                else:
                    rows.append(m)
                    factors.append(s if head_of is None else s[head_of])
            updates = [u.view(ws[i].shape) for u, i in zip(torch._foreach_mul(rows, factors), blocks)]
            torch._foreach_mul_(updates, lr)
            if ok is not None:
                torch._foreach_mul_(updates, ok.to(updates[0].dtype))
            torch._foreach_sub_([ws[i] for i in blocks], updates)
