"""8-bit AdamW state: GaLoreAdamW with both moments in blockwise 8-bit (torchao's
OptimState8bit). torchao is imported when the first such optimizer is built."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings

import torch

from ..compiling import raise_recompile_limit, with_fallback
from .functional import adam_step_bound
from .galore import GaLoreAdamW


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with both moments held in blockwise 8-bit (torchao's OptimState8bit).

    Tensors under 4096 elements (norms) stay fp32, as in bitsandbytes. The math is the
    fp32 AdamW's, on dequantized moments that are quantized again after the update; no
    coordinate steps further than fp32 Adam could (see `_update_8bit`).
    """

    min_8bit_size = 4096
    block_size = 256
    stacks_vectors = False  # a stack of vectors would be quantized where each one is not

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        convention: str = "torch",
    ):
        self._q = _optim_state_8bit()
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, convention=convention)

    def _quantized(self, t: torch.Tensor) -> bool:
        return t.numel() >= self.min_8bit_size and t.numel() % self.block_size == 0

    def _store(self, state: dict, key: str, value: torch.Tensor) -> None:
        if not self._quantized(value):
            state[key] = value
            return
        q = state.get(key)
        if not isinstance(q, self._q) or q.shape != value.shape:
            self._zeros(state, key, value)
        q = state[key]
        _requantize(value.float(), q.codes, q.scale, q.qmap, positive=key == "exp_avg_sq")

    def _zeros(self, state: dict, key: str, like: torch.Tensor) -> None:
        # created quantized: storing a float zero tensor would quantize it through int64
        # temporaries (5 GiB at once for the 7b embedding and head)
        if not self._quantized(like):
            super()._zeros(state, key, like)
        else:
            state[key] = self._q.zeros(
                like.shape, signed=(key == "exp_avg"), block_size=self.block_size, device=like.device
            )

    def _stackable(self, state: dict) -> bool:
        # moments kept in fp32 (small matrices) would be quantized by _store as a stack
        return isinstance(state.get("exp_avg"), self._q)

    def _stack_moments(self, moments: list) -> torch.Tensor:
        """Stacked codes with the blocks' scales in a row: every matrix holds whole blocks,
        so the stack is the 8-bit tensor of the stacked moments."""
        m = moments[0]
        return self._q(torch.stack([x.codes for x in moments]), torch.cat([x.scale for x in moments]), m.qmap, m.signed)

    def _unstack_moments(self, stacked, moments: list) -> None:
        torch._foreach_copy_([x.codes for x in moments], list(stacked.codes.unbind(0)))
        torch._foreach_copy_([x.scale for x in moments], list(stacked.scale.chunk(len(moments))))

    def _dequant(self, state: dict, key: str) -> torch.Tensor:
        v = state[key]
        return v.dequantize() if isinstance(v, self._q) else v

    def _inner(self, rs, states, group, ok=None, splits=None):
        b1, b2 = group["betas"]
        quant = [i for i, st in enumerate(states) if isinstance(st["exp_avg"], self._q)]
        plain = [i for i, st in enumerate(states) if not isinstance(st["exp_avg"], self._q)]
        nums: list = [None] * len(rs)
        dens: list = [None] * len(rs)
        divs: list = [None] * len(rs)
        if plain:  # small tensors keep fp32 moments: the foreach path of GaLoreAdamW
            n, d, v = super()._inner([rs[i] for i in plain], [states[i] for i in plain], group, ok)
            for j, i in enumerate(plain):
                nums[i], dens[i], divs[i] = n[j], d[j], v[j]
        # one compiled specialization whether or not the step may be skipped on the device
        keep = ok if ok is not None else torch.ones((), dtype=torch.bool, device=rs[0].device)
        for i in quant:
            st = states[i]
            t = float(st["moment_step"])
            # the step-dependent scalar goes in as a tensor: as a Python float, the compiled
            # function would be specialized (recompiled) for every step
            bc2 = torch.full((), math.sqrt(1 - b2**t), device=rs[i].device)
            bound = torch.full((), adam_step_bound(b1, b2, t) * (1 - b1**t), device=rs[i].device)
            nums[i] = _update_8bit(
                st["exp_avg"],
                st["exp_avg_sq"],
                rs[i],
                b1,
                b2,
                self._eps(group, t),
                bc2,
                bound,
                keep,
                compiled=rs[i].is_cuda,
            )
            dens[i] = torch.ones((), device=rs[i].device)  # the direction is complete but for 1 / bc1
            divs[i] = 1 - b1**t
        return nums, dens, divs


def _update_8bit(
    m,
    v,
    r,
    b1: float,
    b2: float,
    eps: float,
    bc2_sqrt: torch.Tensor,
    bound: torch.Tensor,
    keep: torch.Tensor,
    compiled: bool = False,
) -> torch.Tensor:
    """Adam moments m, v held in 8-bit (torchao's OptimState8bit): dequantize, update,
    quantize again where `keep` (a 0-d bool tensor) is True; returns
    m / (sqrt(v) / bc2_sqrt + eps), each entry within +-bound.

    Two guards keep every coordinate's step within what fp32 Adam could take (bound =
    adam_step_bound * (1 - b1^t)): a positive second moment is never stored as 0 (the
    smallest code instead; the first code of the unsigned map is 3.25e-7 of the block's
    maximum, and a rare token's v below half of that once made m / eps steps), and the
    direction is clipped to the exact-Adam bound, which only quantization error can reach.

    The math runs on the moments' codes and scales through torchao's own quantization
    functions (what the subclass's dequantize() and copy_() call), so that the compiled
    version takes plain tensors: with tensor-subclass inputs each compiled call cost about
    1 ms of host time, 70 ms a step at 60m. Under torch.compile on CUDA it is one fused
    kernel per moment shape."""
    fn = _compiled_update() if compiled else _update_8bit_codes
    return fn(m.codes, m.scale, m.qmap, v.codes, v.scale, v.qmap, r, b1, b2, eps, bc2_sqrt, bound, keep)


def _requantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    qmap: torch.Tensor,
    positive: bool,
    keep: torch.Tensor | None = None,
):
    """Store x into (codes, scale) blockwise (only where the 0-d bool `keep` is True, if
    given); a positive x of an unsigned map never becomes code 0."""
    scaled, new_scale = _ao["scale"](x, codes.numel() // scale.numel())
    q = _ao["quantize"](scaled, qmap)
    if positive:
        q = torch.where((q == 0) & (x > 0), torch.ones_like(q), q)
    if keep is not None:
        q, new_scale = torch.where(keep, q, codes), torch.where(keep, new_scale, scale)
    codes.copy_(q)
    scale.copy_(new_scale)


def _update_8bit_codes(
    mc,
    ms,
    mq,
    vc,
    vs,
    vq,
    r,
    b1: float,
    b2: float,
    eps: float,
    bc2_sqrt: torch.Tensor,
    bound: torch.Tensor,
    keep: torch.Tensor,
):
    m32 = _ao["dequant"](mc, mq, ms).lerp(r, 1 - b1)
    v32 = _ao["dequant"](vc, vq, vs).mul(b2).addcmul(r, r, value=1 - b2)
    _requantize(m32, mc, ms, mq, positive=False, keep=keep)
    _requantize(v32, vc, vs, vq, positive=True, keep=keep)
    d = m32 / (v32.sqrt() / bc2_sqrt + eps)
    return torch.minimum(torch.maximum(d, -bound), bound)


@functools.cache
def _compiled_update():
    """The update compiled (one specialization per moment shape), falling back to eager; built once."""
    raise_recompile_limit(64)
    return with_fallback(torch.compile(_update_8bit_codes, dynamic=False), _update_8bit_codes, "the 8-bit Adam update")


_ao: dict = {}  # torchao's 8-bit quantization functions, imported with the first GaLoreAdamW8bit


@contextlib.contextmanager
def _quiet_import():
    """torchao's import logs every CUDA extension its wheel cannot load for this torch (kernels
    the 8-bit state does not use) and torch warns of an enum it registers: noise on every run."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _optim_state_8bit():
    try:
        with _quiet_import():
            from torchao.optim import quant_utils
            from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        raise ImportError(
            "8-bit optimizer state needs torchao: pip install torchao "
            "(or use GaLoreAdamW / method 'galore', which keeps fp32 state)"
        ) from None
    _ao.update(
        dequant=quant_utils.dequant_with_qmap,
        quantize=quant_utils.quantize_8bit_with_qmap,
        scale=quant_utils.scale_tensor,
    )
    return OptimState8bit
