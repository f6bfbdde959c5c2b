"""LLaMA decoder in one file, parameter names matching Hugging Face LlamaForCausalLM.

RMSNorm -> causal SDPA attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, untied
input and output embeddings, normal(0, 0.02) init as in the GaLore/ReLoRA reference runs.
The loss is a fused linear + cross-entropy that never holds fp32 logits for the whole batch.
The element-wise pieces and the loss come from kernels.py: torch's, or liger-kernel's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kernels import TORCH, Kernels


class RMSNorm(nn.Module):
    kernels: Kernels = TORCH  # LlamaForCausalLM.use_kernels sets the model's

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D) in HF's rotate-half layout
    return emb.cos(), emb.sin()


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for generation: written in
    place at positions [pos, pos + T), so a new token attends to the cache, not a recompute."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0  # tokens already in the cache; the model advances it after each forward

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    kernels: Kernels = TORCH

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.index = index  # the layer's place: its slot in a KVCache
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = self.kernels.rope(q, k, cos, sin)
        if cache is not None:  # the new tokens attend to every cached one (a prompt only at pos 0)
            k, v = cache.append(self.index, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # flash on CUDA
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def aligned_pad(width: int) -> int:
    """Zero units that make an MLP width a multiple of 64, for widths that are not a multiple
    of 8 (1b's 5461): cuBLAS has no tensor-core kernels for such bf16 shapes."""
    return (-width) % 64 if width % 8 else 0


class MLP(nn.Module):
    kernels: Kernels = TORCH

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.mlp_width
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.pad = aligned_pad(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # only plain linears: ReLoRA's (and FSDP2's wrapped) modules run their own forward
        linears = (self.gate_proj, self.up_proj, self.down_proj)
        if self.pad and x.is_cuda and all(type(m) is nn.Linear for m in linears):
            return self.aligned(x)
        return self.down_proj(self.kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))

    def aligned(self, x: torch.Tensor) -> torch.Tensor:
        """The same function computed `pad` units wider: the weights are padded with zeros on
        the fly, so the extra units are exactly 0 (silu(0) * 0) and contribute nothing, and
        the parameters, their gradients and the optimizer never see the padding."""
        n = self.pad
        gate = PaddedLinear.apply(x, self.gate_proj.weight, n, 0)
        up = PaddedLinear.apply(x, self.up_proj.weight, n, 0)
        return PaddedLinear.apply(self.kernels.silu_mul(gate, up), self.down_proj.weight, 0, n)


class PaddedLinear(torch.autograd.Function):
    """x @ W'^T for W' = W with `rows` zero rows (more outputs) and `cols` zero columns (more
    inputs) appended. Backward pads W again rather than keeping the padded copy alive from
    forward (docs/benchmarks.md, sixth session); W's gradient is the padded product's
    top-left block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.pad = (rows, cols)
        return F.linear(x, F.pad(w, (0, cols, 0, rows)))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w = ctx.saved_tensors
        rows, cols = ctx.pad
        gx = gw = None
        if ctx.needs_input_grad[0]:  # padded by another op than forward's, so that a compiled
            # graph does not share one padded copy between forward and backward (keeping it alive)
            wp = torch.cat([w, w.new_zeros(rows, w.shape[1])]) if rows else w
            gx = gy @ (torch.cat([wp, wp.new_zeros(wp.shape[0], cols)], 1) if cols else wp)
        if ctx.needs_input_grad[1]:
            gw = (gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))[: w.shape[0], : w.shape[1]]
        return gx, gw, None, None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """The `model.` prefix of HF's LlamaForCausalLM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@torch.no_grad()
def row_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each row's mean next-token loss, shape (B,): what evaluation needs for a standard
    error. Logits exist a chunk of rows at a time, in fp32."""
    B, T = targets.shape
    rows = max(1, chunk // T)
    out = []
    for s in range(0, B, rows):
        logits = (h[s : s + rows] @ weight.t()).float()
        out.append(
            F.cross_entropy(logits.flatten(0, 1), targets[s : s + rows].flatten(), reduction="none").view(-1, T).mean(1)
        )
    return torch.cat(out)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.kernels = TORCH
        self.loss_fn = TORCH.cross_entropy  # what forward calls: compiled on its own by compile_parts
        self.reset_parameters()

    def use_kernels(self, k: Kernels) -> None:
        """Compute the norms, rotary embeddings, SwiGLU and the loss with `k` (kernels.kernels):
        the same functions, other implementations. Before compile_parts."""
        self.kernels, self.loss_fn = k, k.cross_entropy
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.kernels = k

    def reset_parameters(self) -> None:
        for m in self.modules():
            init_module(m, self.config.init_std)

    def compile_parts(self, on: bool = True) -> None:
        """torch.compile each decoder layer and the loss on their own (on=False undoes it).

        For a model whose layers FSDP2 gathers one at a time: its hooks run between the
        layers, so the layers are compiled one by one; the loss (the largest element-wise
        work of the step, over (tokens, vocab) logits) is compiled too, which it would not
        be as part of an eager root module."""
        for layer in self.model.layers:
            if on:
                layer.compile()
            else:
                layer._compiled_call_impl = None
        loss = self.kernels.cross_entropy
        self.loss_fn = torch.compile(loss) if on else loss

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states of tokens idx (B, T); with a cache, they follow the cached
        tokens (positions pos..pos + T) and the cache advances."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope_cos[start : start + T].to(x.dtype), self.rope_sin[start : start + T].to(x.dtype)
        for layer in self.model.layers:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The logits (B, V) after the tokens idx (B, T) that follow the cache's: the prompt
        at position 0, then one token at a time. Advances the cache."""
        if idx.shape[1] > 1 and cache.pos:
            raise ValueError("several tokens at once are only for the prompt (position 0)")
        return self.lm_head(self.hidden_states(idx, cache)[:, -1])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, per_row: bool = False) -> torch.Tensor:
        """Logits (B, T, V) when targets is None, else the mean next-token loss (each row's
        mean loss, without gradient, with per_row)."""
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h)
        if per_row:
            return row_losses(h, self.lm_head.weight, targets)
        return self.loss_fn(h, self.lm_head.weight, targets)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_module(m: nn.Module, std: float) -> None:
    """The initial weights of one module (its own, not its children's)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=std)
    elif isinstance(m, RMSNorm):
        nn.init.ones_(m.weight)


def build_model(
    cfg: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    transform: Callable[[str, nn.Module], nn.Module] | None = None,
) -> LlamaForCausalLM:
    """The model created in `dtype` on `device` directly: a 7b never exists in fp32 (27 GB).

    With `transform`, the model is laid out without memory first and each module is then
    created, initialized and handed to transform(name, module), which may return a
    replacement (int8weights.quantizer): the whole model never exists in `dtype` at once.
    The modules are initialized in reset_parameters' order, so the weights are the same."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device if transform is None else "meta"):
            model = LlamaForCausalLM(cfg)
        if transform is not None:
            with torch.device(device):
                cos, sin = rope_cache(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
            model.rope_cos, model.rope_sin = cos, sin
            for m in model.modules():  # the draws of the constructors' own initialization
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    scratch = torch.empty(m.weight.shape, device=device)
                    scratch.uniform_() if isinstance(m, nn.Linear) else scratch.normal_()
            # by name: a list of the modules themselves would keep every replaced one (and its
            # weights in `dtype`) alive until the end
            for name in [n for n, _ in model.named_modules()]:
                m = model.get_submodule(name)
                if next(m.parameters(recurse=False), None) is None:
                    continue
                m.to_empty(device=device, recurse=False)
                init_module(m, cfg.init_std)
                new = transform(name, m)
                if new is not m:
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, new)
                del m, new
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype)  # RoPE tables are computed in fp32, then stored like the weights
