"""LoRA layers for ReLoRA: factors on frozen weights, merged into the weights and restarted.

    y = x W^T + scale * (x A^T) B^T        W frozen, A (r, in) Kaiming-uniform, B (out, r) zeros

B starts at zero so the model is unchanged by wrapping, and A is random so B gets a
gradient from the very first step (the reference code zeroes both, and nothing learns until
the first merge). Every `reset_interval` steps: W += scale * B @ A in fp32, A re-drawn, B
zeroed, the factors' optimizer moments pruned, and the learning rate re-warmed from 0.
An optional full-rank warm start trains W itself first, in the same run: the factors are
there from the start but frozen and skipped, so the model's structure (its parameter names,
its FSDP2 sharding, its compiled graph's modules) never changes; the switch only flips
which parameters require gradients. Merges, re-draws and pruning work on FSDP2 shards too.

With `quantize` (int8 row-wise or NF4 blocks of 64, both by bitsandbytes), the frozen W of
the LoRA phase is held as codes plus scales: a merge dequantizes, adds B @ A in fp32 and
quantizes again. Forward and backward dequantize on the fly and keep only the codes.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .dtensor import full, local, local_part, shaped_like

NF4_BLOCK = 64


def _bnb():
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        raise ImportError("method.quantize needs bitsandbytes: pip install bitsandbytes") from None
    return bf


def quantize_weight(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of w: int8 with one absmax per row, or NF4 with one per 64 values."""
    bf = _bnb()
    if kind == "int8":
        codes, scales, _ = bf.int8_vectorwise_quant(w.half())
        return codes, scales
    codes, state = bf.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")
    return codes, state.absmax


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, kind: str, shape, dtype) -> torch.Tensor:
    bf = _bnb()
    if kind == "int8":
        return bf.int8_vectorwise_dequant(codes, scales).to(dtype)
    state = bf.QuantState(
        absmax=scales,
        shape=torch.Size(shape),
        code=bf.get_4bit_type("nf4", device=codes.device),
        blocksize=NF4_BLOCK,
        quant_type="nf4",
        dtype=dtype,
    )
    return bf.dequantize_4bit(codes, state)


class _QuantizedLinear(torch.autograd.Function):
    """y = x W^T for a quantized frozen W; saves the codes, never the dequantized W."""

    @staticmethod
    def forward(ctx, x, codes, scales, info):
        ctx.save_for_backward(codes, scales)
        ctx.info = info
        return F.linear(x, dequantize_weight(codes, scales, *info))

    @staticmethod
    def backward(ctx, grad):
        codes, scales = ctx.saved_tensors
        return grad @ dequantize_weight(codes, scales, *ctx.info), None, None, None


class ReLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("ReLoRALinear wraps bias-free linears (LLaMA has none)")
        out_f, in_f = base.weight.shape
        if rank > min(out_f, in_f):
            raise ValueError(f"ReLoRA rank {rank} exceeds the smaller side of a {out_f}x{in_f} weight")
        self.weight = base.weight
        self.weight.requires_grad_(False)  # frozen: autograd computes no weight gradient
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=self.weight.device, dtype=self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=self.weight.device, dtype=self.weight.dtype))
        self.rank, self.scale = rank, alpha / rank
        self.active = True  # False during a full-rank warm start: W trains, the factors wait
        self.reset_factors()

    quantized: tuple | None = None  # (kind, shape, dtype) once W is held quantized

    def quantize(self, kind: str) -> None:
        """Hold the frozen W as int8 / NF4 codes from now on (the LoRA phase only)."""
        w = self.weight.detach()
        codes, scales = quantize_weight(w, kind)
        self.quantized = (kind, tuple(w.shape), w.dtype)
        del self.weight
        self.register_buffer("weight_q", codes)
        self.register_buffer("weight_scale", scales)

    def frozen_weight(self) -> torch.Tensor:
        if self.quantized is None:
            return self.weight
        return dequantize_weight(self.weight_q, self.weight_scale, *self.quantized)

    def set_lora_phase(self, lora: bool) -> None:
        self.active = lora
        if self.quantized is None:
            self.weight.requires_grad_(not lora)
        self.lora_A.requires_grad_(lora)
        self.lora_B.requires_grad_(lora)

    @torch.no_grad()
    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear and LoRA use: bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        a = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        local(self.lora_A).copy_(local_part(a, self.lora_A))  # every rank draws all of A, keeps its rows
        local(self.lora_B).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            y = F.linear(x, self.weight)
        else:
            y = _QuantizedLinear.apply(x, self.weight_q, self.weight_scale, self.quantized)
        if self.active:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merge(self) -> None:
        # FSDP2 splits W and B by the same output rows; A (r x in) is small and gathered
        delta = (local(self.lora_B).float() @ full(self.lora_A).float()) * self.scale
        if self.quantized is not None:  # dequantize, add, quantize again
            kind, _, dtype = self.quantized
            codes, scales = quantize_weight((self.frozen_weight().float() + delta).to(dtype), kind)
            self.weight_q.copy_(codes)
            self.weight_scale.copy_(scales)
            return
        w = local(self.weight)
        w.copy_((w.float() + delta).to(w.dtype))


def wrap(model: nn.Module, targets: str, rank: int, alpha: float) -> list[str]:
    """Replace every matching nn.Linear with a ReLoRALinear in place; returns their names."""
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n + ".weight")]
    if not names:
        raise ValueError(f"method.targets={targets!r} matches no linear layer")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ReLoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_modules(model: nn.Module) -> list[ReLoRALinear]:
    return [m for m in model.modules() if isinstance(m, ReLoRALinear)]


def merged_state_dict(state: dict[str, torch.Tensor], scale: float, quantize: str = "none") -> dict[str, torch.Tensor]:
    """A plain LLaMA state dict from a ReLoRA one: W + scale * B @ A, factors dropped
    (a quantized W is dequantized first)."""
    state = dict(state)
    for k in [k for k in state if k.endswith(".weight_q")]:
        prefix = k[: -len("weight_q")]
        a = state[prefix + "lora_A"]
        shape = (state[prefix + "lora_B"].shape[0], a.shape[1])
        state[prefix + "weight"] = dequantize_weight(
            state.pop(k), state.pop(prefix + "weight_scale"), quantize, shape, a.dtype
        )
    out = {}
    for k, v in state.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        prefix = k[: -len("weight")]
        if k.endswith(".weight") and prefix + "lora_A" in state:
            delta = state[prefix + "lora_B"].float() @ state[prefix + "lora_A"].float() * scale
            v = (v.float() + delta).to(v.dtype)
        out[k] = v
    return out


def _keep_mask(x: torch.Tensor, mode: str, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """This rank's rows of the mask of the entries of moment x that pruning keeps. Under
    FSDP2 the moments are row shards: thresholds and masks come from the whole moment
    (every rank computes the same), each rank edits its rows."""
    whole, mine = full(x), local(x)
    if mode == "reset" or fraction >= 1.0:
        return torch.zeros_like(mine, dtype=torch.bool)
    if mode == "magnitude":
        k = int(fraction * whole.numel())
        if k == 0:
            return torch.ones_like(mine, dtype=torch.bool)
        return mine.abs() > whole.abs().flatten().float().kthvalue(k).values
    return local_part((torch.rand(whole.shape, generator=generator) >= fraction).to(whole.device), x)


@torch.no_grad()
def prune_moments(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    mode: str,
    fraction: float,
    generator: torch.Generator | None = None,
    joint: bool = True,
) -> float:
    """Zero `fraction` of the optimizer moments of `params`; returns the fraction zeroed.

    magnitude: the smallest |x| (per tensor) are zeroed; random: a random subset; reset: all.
    joint (the default): one mask per parameter, chosen on the first moment, zeroes both
    moments at the same coordinates. Independent masks (the reference code's) can keep m
    where they zero v, and the next step then moves that coordinate by lr * m / eps.
    """
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p, {})
        mask = None
        for key in ("exp_avg", "exp_avg_sq"):
            if state.get(key) is None:
                continue
            x = shaped_like(state[key], p)
            if mask is None or not joint:
                mask = _keep_mask(x, mode, fraction, generator)
            local(x).mul_(mask.to(local(x).dtype))
            zeroed += int((full(x) == 0).sum())
            total += x.numel()
    return zeroed / total if total else 0.0
