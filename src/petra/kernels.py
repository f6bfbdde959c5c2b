"""The decoder's element-wise work and its loss, two ways (train.kernels).

"torch": plain PyTorch on every device, fused by torch.compile where the model is compiled.
"liger": liger-kernel's Triton kernels (CUDA only; `pip install 'petra[liger]'`): RMSNorm,
rotary embedding, SiLU x up, and the fused linear + cross-entropy. Both compute the same
functions (Hugging Face Llama's: RMSNorm normalizes in fp32 and casts back before the weight);
tests/test_kernels.py holds them equal on a GPU. A leaf: torch only, liger imported when chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KERNELS = ("torch", "liger")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()  # normalize in fp32 like HF, cast back before the weight
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h @ W^T) against targets, computed chunk by chunk.

    Forward computes each chunk's logits in fp32, its loss and its gradients at once and
    keeps only the gradients (same size as h and W), so neither the (N, V) logits nor their
    softmax ever exist for the whole batch. Backward just scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp32, fp64 for fp64
        count = (targets != -100).sum().clamp(min=1)
        loss = torch.zeros((), dtype=acc, device=h.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        for s in range(0, n, chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits = (hc @ weight.t()).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != -100
            safe_t = tc.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            if need_h or need_w:
                g = torch.softmax(logits, dim=-1)  # d loss_sum / d logits
                g.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
                g *= valid[:, None]
                g = (g / count).to(h.dtype)
                if need_h:
                    grad_h[s : s + chunk] = g @ weight
                if need_w:
                    gw = g.t() @ hc
                    if grad_w is None:  # one chunk: this product is the gradient; more: summed in fp32
                        grad_w = gw if n <= chunk else gw.to(acc)
                    else:
                        grad_w.add_(gw)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return loss / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = grad_w * grad_out if grad_w is not None else None
        return gh, gw, None, None


def fused_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    return FusedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk)


@dataclass(frozen=True)
class Kernels:
    """One implementation of each piece the decoder and its loss call."""

    name: str
    rms_norm: Callable  # (x, weight, eps) -> normalized x
    rope: Callable  # (q, k, cos, sin) -> rotated (q, k), q and k (B, H, T, D), cos/sin (T, D)
    silu_mul: Callable  # (gate, up) -> silu(gate) * up
    cross_entropy: Callable  # (h, weight, targets) -> mean loss over targets != -100


TORCH = Kernels("torch", rms_norm, rope, silu_mul, fused_cross_entropy)


def kernels(name: str) -> Kernels:
    """The implementation set called `name` (KERNELS); "liger" imports liger-kernel."""
    if name == "torch":
        return TORCH
    if name != "liger":
        raise ValueError(f"kernels={name!r} is not allowed; choose one of: {', '.join(KERNELS)}")
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as LCE
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def liger_rms_norm(x, weight, eps):
        # casting "llama": only the normalization in fp32, as rms_norm; out of place: the
        # gradient autograd hands to backward is left as it was given
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    @torch.compiler.disable  # its forward reads a count with .item(): eager, after the compiled body
    def liger_cross_entropy(h, weight, targets):
        # positional (the Function takes no keywords): bias, class weights, ignore_index,
        # z-loss scale, label smoothing, reduction, softcap, return_z_loss, then accum_dtype
        # fp32: the weight's gradient summed over chunks in fp32, as FusedLinearCrossEntropy's
        args = (None, None, -100, 0.0, 0.0, "mean", None, False, torch.float32)
        return LCE.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), *args)[0]  # the loss alone

    return Kernels(
        "liger",
        liger_rms_norm,
        LigerRopeFunction.apply,
        LigerSiLUMulFunction.apply,
        liger_cross_entropy,
    )
