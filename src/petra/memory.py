"""Analytic memory model for training a LLaMA preset with each method.

Two views:
- the papers' convention (GaLore Table 2): bf16 weights + optimizer states (+ GaLore's
  projectors), nothing else, in GiB;
- a training breakdown: weights, gradients, optimizer state, projectors and an activation
  estimate for one micro-batch, for the dtype petra actually trains in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LOWRANK_METHODS, UNSHARDED_METHODS, ModelConfig, RunConfig, replace

GIB = 2**30

# figures the seed article quotes (1B scale), for side-by-side printing
SEED_FIGURES = {("1b", "galore"): 4.38, ("1b", "relora"): 6.17}
INT8_CHUNK = 2 * 4 * 2**24  # quantizing: fp32 values and random numbers of one chunk of blocks


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
    if me.int8_weights != "off":  # codes + absmax; an update's fp32 copy and new codes of one matrix
        hidden = s.total - s.dense
        int8_bytes = 1 + 4 / me.int8_block  # a code and its share of its block's fp32 absmax
        weights = weight_bytes * s.dense + int8_bytes * hidden + 5 * max(m * n for m, n in s.targets) + INT8_CHUNK
    projectors = 0.0
    kept = weight_bytes * s.total  # what a layer-wise step with clipping holds until backward ends
    if name in ("full", "full8bit"):
        state = 2 * sb * s.total
        grads = weight_bytes * s.total
    elif name in LOWRANK_METHODS:
        low = 0.0
        kept = weight_bytes * s.dense
        for m, n in s.targets:
            short, long_ = min(m, n), max(m, n)
            rr = min(r, short)
            if name == "galore-adafactor":
                low += 4 * (rr + long_)  # factored second moment, fp32 row + column
            else:
                low += 2 * sb * rr * long_
            projectors += weight_bytes * short * rr
            kept += weight_bytes * rr * long_  # the projected gradient
        state = 2 * sb * s.dense + low  # 8-bit holds the embeddings' and head's moments in 8 bits too
        grads = weight_bytes * s.total
    elif name == "muon":  # a momentum buffer for the hidden matrices, AdamW for the rest
        hidden = s.total - s.dense
        state = state_bytes * hidden + 2 * state_bytes * s.dense
        grads = weight_bytes * s.total
    elif name == "adam-mini":  # a first moment per weight; a second per row, head or norm (optim/adam_mini.py)
        mc = cfg.model
        d, f, heads = mc.hidden_size, mc.mlp_width, mc.num_attention_heads
        blocks = 2 * mc.vocab_size + mc.num_hidden_layers * (2 * heads + 3 * d + 2 * f + 2) + 1
        state = state_bytes * (s.total + blocks)
        grads = weight_bytes * s.total
    elif name == "relora":
        lora = sum(r * (m + n) for m, n in s.targets)
        weights += weight_bytes * lora
        state = 2 * state_bytes * (s.dense + lora)
        grads = weight_bytes * (s.dense + lora)  # frozen W gets no gradient
    else:
        raise ValueError(f"unknown method {name!r}")
    # Layer-wise: one parameter's gradient at a time, plus what clipping keeps until the global
    # norm is known; with gradient accumulation the earlier micro-batches still fill every .grad.
    if me.layerwise and cfg.micro_batch >= cfg.train.batch_size:
        largest = weight_bytes * max(max(m * n for m, n in s.targets), cfg.model.vocab_size * cfg.model.hidden_size)
        grads = largest + (kept if cfg.train.grad_clip > 0 else 0)
    return {"weights": weights, "gradients": grads, "optimizer_state": state, "projectors": projectors}


# Saved for backward per token and decoder layer, in activation-dtype elements: the norms' and
# projections' inputs, q, k, v, the attention output and the residual stream (a multiple of
# the hidden size) and the SwiGLU's gate, up and product (a multiple of the MLP width; the two
# keep the structural 10:4 ratio, since every preset has the same width ratio). With the
# loss's and LoRA's terms below, fitted to the peaks bench.py measured on an H100 with the
# model compiled, as training runs it (benchmarks/plan_validation.py, docs/plan.md).
SAVED_PER_HIDDEN, SAVED_PER_MLP = 7.25, 2.9
LORA_SAVED_PER_RANK = 3.0  # ReLoRA: each target's rank-r products, per target and rank
LOSS_COPIES = 1.3  # fp32 (tokens, vocab) buffers of the loss, in copies of all the micro-batch's logits


def activation_bytes(cfg: RunConfig, act_bytes: int = 2) -> float:
    """Activation memory of one micro-batch with flash attention (no T x T scores): what
    every decoder layer saves for backward (with activation checkpointing: its input, plus
    one layer recomputed at a time) and the embeddings' output."""
    m = cfg.model
    bt = cfg.micro_batch * cfg.seq_len
    per_token = SAVED_PER_HIDDEN * m.hidden_size + SAVED_PER_MLP * m.mlp_width
    if cfg.method.name == "relora":
        per_token += LORA_SAVED_PER_RANK * len(shapes(m).targets) / m.num_hidden_layers * cfg.method.rank
    layer = bt * per_token * act_bytes
    if m.activation_checkpointing:
        saved = m.num_hidden_layers * bt * m.hidden_size * act_bytes + layer
    else:
        saved = m.num_hidden_layers * layer
    return saved + bt * m.hidden_size * act_bytes


def loss_bytes(cfg: RunConfig, act_bytes: int = 2) -> float:
    """The fused loss's memory: its fp32 logit buffers, the head's fp32 gradient and the hidden
    states' gradient. The loss works on chunks of rows, yet the measured peaks grow with all
    rows of the micro-batch (compiled, the chunks' buffers are not reused), so it is counted so."""
    m = cfg.model
    bt = cfg.micro_batch * cfg.seq_len
    return LOSS_COPIES * bt * m.vocab_size * 4 + m.vocab_size * m.hidden_size * 4 + bt * m.hidden_size * act_bytes


def paper_estimate_gib(cfg: RunConfig) -> float:
    """The papers' convention: bf16 weights + bf16 optimizer states (+ projectors)."""
    b = method_bytes(cfg)
    return (b["weights"] + b["optimizer_state"] + b["projectors"]) / GIB


def can_shard(cfg: RunConfig) -> bool:
    """Whether the method runs under FSDP2 (the methods' checks, without importing them)."""
    return cfg.method.name not in UNSHARDED_METHODS and cfg.method.quantize == "none"


def breakdown_gib(cfg: RunConfig, weight_bytes: int = 2, gpus: int = 1, mode: str = "ddp") -> dict[str, float]:
    """Each part of training memory in GiB and `total`, the estimated peak.

    Gradients appear in backward as the activations are freed, so without gradient
    accumulation the peak holds the larger of the two (the loss's buffers counted with the
    activations), not their sum. With accumulation the earlier micro-batches' gradients stay,
    and a compiled backward hands out all new gradients before they are added: the peak holds
    the gradients and the larger of the activations and a second set of gradients. Layer-wise
    updates keep only what memory.method_bytes counts, beside the activations.
    `gradients` here is the part held at the peak beyond the activations, so the parts add
    up to `total`; `gradients_all` is their full size.

    With `gpus` processes, the figures are one process's: its rows of every global batch
    (micro-batches of train.micro_batch_size, or all its rows); under DDP (`mode`) whole
    replicas of everything else; under FSDP2 ("fsdp") a 1/gpus share of the weights,
    gradients and optimizer state, plus one decoder-layer unit's and the root's (embeddings,
    head) whole weights and gradients while gathered, and the projectors, which every process
    holds whole. (Computed, not yet checked against GPU peaks: docs/distributed.md.)"""
    if gpus > 1:  # each process takes its rows of every global batch
        rows = cfg.train.batch_size // gpus
        cfg = replace(
            cfg, train={"batch_size": rows, "micro_batch_size": min(cfg.train.micro_batch_size or rows, rows)}
        )
    # petra keeps low-rank moments in fp32 (state_bytes 4) and torch AdamW keeps them in the
    # parameter dtype; 8-bit is 8-bit either way
    state_bytes = 4 if cfg.method.name in LOWRANK_METHODS or cfg.method.layerwise else weight_bytes
    state_bytes = {"auto": state_bytes, "fp32": 4, "bf16": 2}[cfg.method.moments]
    b = method_bytes(cfg, weight_bytes=weight_bytes, state_bytes=state_bytes)
    if gpus > 1 and mode == "fsdp":
        m = cfg.model
        gathered = weight_bytes * (
            (4 * m.hidden_size**2 + 3 * m.hidden_size * m.mlp_width + 2 * m.hidden_size) * cfg.train.fsdp_unit_layers
            + 2 * m.vocab_size * m.hidden_size
        )
        for part in ("weights", "gradients"):
            b[part] = b[part] / gpus + gathered
        b["optimizer_state"] /= gpus  # the projectors stay whole on every process
    b["activations"] = activation_bytes(cfg, act_bytes=weight_bytes) + loss_bytes(cfg, act_bytes=weight_bytes)
    b["gradients_all"] = grads = b["gradients"]
    acts, accumulating = b["activations"], cfg.micro_batch < cfg.train.batch_size
    if not cfg.method.layerwise:  # layer-wise compiles layer by layer: a layer's new gradients at a time
        beyond = max(0.0, grads - acts)  # the gradients take the activations' place in backward
        # accumulating, the compiled backward hands out every new gradient before adding them up
        b["gradients"] = grads + beyond if accumulating else beyond
    out = {k: v / GIB for k, v in b.items()}
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer_state", "projectors", "activations"))
    return out
