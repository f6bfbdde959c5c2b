"""Hidden matrices held in 8 bits: int8 codes with one absmax per block of 64 values (the
block is `method.int8_block`; per row where a matrix does not split into such blocks),
dequantized for each linear's forward and backward, and updated with stochastic rounding.

Why stochastic rounding: a quantization step is absmax/127 of its block, and an update
smaller than half a step is lost to round-to-nearest every time, however many steps agree
(Q-GaLore, arXiv 2407.08296). Rounding up with a probability equal to the remainder makes
each write unbiased, E[dequantize(quantize(w))] = w, so small updates add up in expectation.

`Int8Weight` is a tensor subclass that the model and the optimizer see as an ordinary
parameter of the model's dtype; its gradient is a plain tensor. Every in-place operation on
it (the optimizer's add_, addmm_, mul_, the foreach kernels) runs on an fp32 dequantized copy
and writes back with one rounding; any other operation sees the dequantized tensor.
`QuantizedLinear` keeps only the codes for backward. Loading (a checkpoint's codes, or plain
weights) is exact or rounds to nearest: only updates round stochastically. The random
numbers come from torch's generator of the weight's device, which checkpoints save, so a
resumed run draws the same ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

BLOCK = 64  # the default block: see docs/int8_weights.md for what smaller blocks buy
ROUNDINGS = ("stochastic", "nearest")
_CHUNK_VALUES = 1 << 24  # values quantized at a time: bounds the fp32 temporaries (64 MiB)
aten = torch.ops.aten


def block_size(shape, block: int = BLOCK) -> int:
    return block if math.prod(shape) % block == 0 else shape[-1]


@torch.no_grad()
def quantize(w: torch.Tensor, block: int, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like w, fp32 absmax per block of `block` consecutive values)."""
    x = w.detach().reshape(-1, block)
    codes = torch.empty(x.shape, dtype=torch.int8, device=w.device)
    absmax = torch.empty(x.shape[0], dtype=torch.float32, device=w.device)
    chunk = max(1, _CHUNK_VALUES // block)
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk].to(torch.float32, copy=True)
        top = part.abs().amax(1)
        scaled = part.mul_((127 / top.clamp(min=1e-30))[:, None])
        if stochastic:  # floor(x + u), u uniform in [0, 1): up with probability frac(x)
            scaled = scaled.add_(torch.rand_like(scaled)).floor_()
        else:
            scaled = scaled.round_()
        codes[i : i + chunk] = scaled.clamp_(-127, 127)
        absmax[i : i + chunk] = top
    return codes.reshape(w.shape), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = codes.reshape(absmax.shape[0], -1).float() * (absmax / 127)[:, None]
    return x.reshape(codes.shape).to(dtype)


def _rebuild(codes, absmax, dtype, stochastic):
    return Int8Weight(codes, absmax, dtype, stochastic)


class Int8Weight(torch.Tensor):
    """A matrix of nominal dtype `dtype` held as int8 codes and per-block absmax values."""

    codes: torch.Tensor
    absmax: torch.Tensor
    stochastic: bool

    @staticmethod
    def __new__(cls, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, stochastic: bool = True):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes, absmax, dtype, stochastic=True):
        self.codes, self.absmax, self.stochastic = codes, absmax, stochastic

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def from_float(cls, w: torch.Tensor, stochastic: bool = True, block: int = BLOCK) -> Int8Weight:
        """w quantized (to nearest); later in-place updates round stochastically if `stochastic`."""
        codes, absmax = quantize(w, block_size(w.shape, block), stochastic=False)
        return cls(codes, absmax, w.dtype, stochastic)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.absmax, dtype or self.dtype)

    def write_(self, w: torch.Tensor, stochastic: bool) -> None:
        """Hold w from now on (codes and absmax written in place: every alias sees them)."""
        codes, absmax = quantize(w, self.codes.numel() // self.absmax.numel(), stochastic)
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.codes, self.absmax, self.dtype, self.stochastic)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, stochastic={self.stochastic})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return cls(w.codes, w.absmax, w.dtype, w.stochastic)
        if func is aten.copy_.default and isinstance(args[0], cls):
            dst, src = args[0], args[1]
            if isinstance(src, cls) and src.absmax.shape == dst.absmax.shape:  # a checkpoint: exact
                dst.codes.copy_(src.codes)
                dst.absmax.copy_(src.absmax)
            else:  # plain weights (initial ones): to nearest
                dst.write_(src.dequantize(torch.float32) if isinstance(src, cls) else src.float(), stochastic=False)
            return dst
        inplace = func.overloadpacket.__name__.endswith("_")
        if inplace and func.overloadpacket.__name__.startswith("_foreach_"):
            return _foreach_inplace(func, args, kwargs)
        if inplace and isinstance(args[0], cls):
            w = args[0]
            work = w.dequantize(torch.float32)
            func(work, *tree_map(_fp32, args[1:]), **tree_map(_fp32, kwargs))
            w.write_(work, w.stochastic)
            return w
        dtype = torch.float32 if func is aten._to_copy.default else None  # .float(), .to(): no bf16 step
        return func(*tree_map(lambda a: _plain(a, dtype), args), **tree_map(lambda a: _plain(a, dtype), kwargs))


def _plain(a, dtype=None):
    return a.dequantize(dtype) if isinstance(a, Int8Weight) else a


def _fp32(a):
    """An operand of an update of an Int8Weight, in the fp32 of its working copy."""
    if isinstance(a, Int8Weight):
        return a.dequantize(torch.float32)
    return a.float() if torch.is_tensor(a) and a.is_floating_point() else a


def _foreach_inplace(func, args, kwargs):
    """A foreach in-place op whose first list holds Int8Weights: the plain tensors are updated
    as they are, the Int8Weights through fp32 copies (each list argument split alike)."""
    targets = args[0]
    n = len(targets)
    ours = [i for i, t in enumerate(targets) if isinstance(t, Int8Weight)]
    rest = [i for i, t in enumerate(targets) if not isinstance(t, Int8Weight)]

    def pick(a, idx, conv):
        if isinstance(a, (list, tuple)) and len(a) == n:
            return [conv(a[i]) for i in idx]
        return conv(a) if torch.is_tensor(a) else a

    if rest:
        func(*(pick(a, rest, _plain) for a in args), **kwargs)
    work = [targets[i].dequantize(torch.float32) for i in ours]
    func(work, *(pick(a, ours, _fp32) for a in args[1:]), **kwargs)
    for i, w in zip(ours, work):
        targets[i].write_(w, targets[i].stochastic)
    return None


class _Int8Linear(torch.autograd.Function):
    """x W^T from the codes; backward dequantizes again instead of keeping a copy of W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x, w.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = gy @ w.dequantize(gy.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(w.dtype)
        return gx, gw


class QuantizedLinear(nn.Module):
    """A bias-free linear whose weight is an Int8Weight."""

    def __init__(self, weight: Int8Weight):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Linear.apply(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantizer(rounding: str, block: int = BLOCK):
    """A build_model hook (None for "off"): each decoder layer's linear, once initialized,
    becomes a QuantizedLinear (the embeddings, the head and the norms stay in the model's dtype)."""
    if rounding == "off":
        return None
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")

    def hook(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            if module.bias is not None:
                raise ValueError(f"{name}: int8 weights are for bias-free linears")
            return QuantizedLinear(Int8Weight.from_float(module.weight.detach(), rounding == "stochastic", block))
        return module

    return hook


def quantized_parameters(model: nn.Module) -> int:
    """How many of the model's parameters are held in int8."""
    return sum(p.numel() for p in model.parameters() if isinstance(p, Int8Weight))
