"""Analytic memory model for training a LLaMA preset with each method.

Two views:
- the papers' convention (GaLore Table 2): bf16 weights + optimizer states (+ GaLore's
  projectors), nothing else, in GiB;
- a training breakdown: weights, gradients, optimizer state, projectors and an activation
  estimate for one micro-batch, for the dtype petra actually trains in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LOWRANK_METHODS, ModelConfig, RunConfig

GIB = 2**30

# figures the seed article quotes (1B scale), for side-by-side printing
SEED_FIGURES = {("1b", "galore"): 4.38, ("1b", "relora"): 6.17}


@dataclass
class Shapes:
    targets: list[tuple[int, int]]  # (out, in) of every low-rank target matrix
    dense: int  # parameters that are never low-rank (embeddings, head, norms)

    @property
    def total(self) -> int:
        return self.dense + sum(m * n for m, n in self.targets)


def shapes(m: ModelConfig) -> Shapes:
    d, f, L = m.hidden_size, m.mlp_width, m.num_hidden_layers
    layer = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    return Shapes(targets=layer * L, dense=2 * m.vocab_size * d + (2 * L + 1) * d)


def method_bytes(cfg: RunConfig, weight_bytes: int = 2, state_bytes: float = 2) -> dict[str, float]:
    """Bytes of weights, gradients, optimizer state and projectors (no activations)."""
    s, me = shapes(cfg.model), cfg.method
    name, r = me.name, me.rank
    eight_bit = name.endswith("8bit")
    sb = 1 + 4 / 256 if eight_bit else state_bytes  # blockwise 8-bit: codes + an fp32 scale per 256
    weights = weight_bytes * s.total
    projectors = 0.0
    if name in ("full", "full8bit"):
        state = 2 * sb * s.total
        grads = weight_bytes * s.total
    elif name in LOWRANK_METHODS:
        low = 0.0
        for m, n in s.targets:
            short, long_ = min(m, n), max(m, n)
            rr = min(r, short)
            if name == "galore-adafactor":
                low += 4 * (rr + long_)  # factored second moment, fp32 row + column
            else:
                low += 2 * sb * rr * long_
            projectors += weight_bytes * short * rr
        state = 2 * sb * s.dense + low  # 8-bit holds the embeddings' and head's moments in 8 bits too
        grads = weight_bytes * s.total
    elif name == "muon":  # a momentum buffer for the hidden matrices, AdamW for the rest
        hidden = s.total - s.dense
        state = state_bytes * hidden + 2 * state_bytes * s.dense
        grads = weight_bytes * s.total
    elif name == "adam-mini":  # full first moment; second moments per block, per element for embeddings/head
        state = state_bytes * s.total + state_bytes * s.dense
        grads = weight_bytes * s.total
    elif name == "relora":
        lora = sum(r * (m + n) for m, n in s.targets)
        weights += weight_bytes * lora
        state = 2 * state_bytes * (s.dense + lora)
        grads = weight_bytes * (s.dense + lora)  # frozen W gets no gradient
    else:
        raise ValueError(f"unknown method {name!r}")
    if me.layerwise:  # one parameter's gradient at a time: the largest
        grads = weight_bytes * max(max(m * n for m, n in s.targets), cfg.model.vocab_size * cfg.model.hidden_size)
    return {"weights": weights, "gradients": grads, "optimizer_state": state, "projectors": projectors}


def activation_bytes(cfg: RunConfig, act_bytes: int = 2) -> float:
    """Rough activation memory for one micro-batch with flash attention (no T x T scores):
    per layer the saved inputs of norms, q/k/v/o, the SwiGLU branches and residuals."""
    m = cfg.model
    bt = cfg.micro_batch * cfg.seq_len
    per_layer = bt * (10 * m.hidden_size + 4 * m.mlp_width) * act_bytes
    if m.activation_checkpointing:
        per_layer = bt * m.hidden_size * act_bytes
    return m.num_hidden_layers * per_layer + bt * m.hidden_size * 4


def paper_estimate_gib(cfg: RunConfig) -> float:
    """The papers' convention: bf16 weights + bf16 optimizer states (+ projectors)."""
    b = method_bytes(cfg)
    return (b["weights"] + b["optimizer_state"] + b["projectors"]) / GIB


def breakdown_gib(cfg: RunConfig, weight_bytes: int = 2) -> dict[str, float]:
    # petra keeps low-rank moments in fp32 (state_bytes 4) and torch AdamW keeps them in the
    # parameter dtype; 8-bit is 8-bit either way
    state_bytes = 4 if cfg.method.name in LOWRANK_METHODS or cfg.method.layerwise else weight_bytes
    b = method_bytes(cfg, weight_bytes=weight_bytes, state_bytes=state_bytes)
    b["activations"] = activation_bytes(cfg, act_bytes=weight_bytes)
    out = {k: v / GIB for k, v in b.items()}
    out["total"] = sum(out.values())
    return out
