"""Side-by-side GPU benchmark: petra's methods against the public peers, one process, one GPU.

    python benchmarks/bench.py --presets 60m,350m --impls petra-full,hf-full,petra-galore,galore-torch

Each implementation trains the same preset at the same batch (random tokens, bf16) for
--steps steps after --warmup; we report the median step time, the amortized step time with
the projector refresh (GaLore) included, tokens/s, MFU and peak memory, then ratios of each
petra implementation to each peer. Peers: Hugging Face LlamaForCausalLM (sdpa) with fused
torch AdamW (hf-full) or bitsandbytes AdamW8bit (hf-adamw8bit), galore-torch 1.0
(GaLoreAdamW / GaLoreAdamW8bit), APOLLO (apollo-torch 1.0.3, APOLLOAdamW) and peft LoRA.
Suffix an impl with ':compile' to torch.compile its model, with '+pad' to pad the MLP width
to a multiple of 128 (both models). petra-relora-int8 / -nf4 hold ReLoRA's frozen weights
quantized by bitsandbytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from petra.config import build_config  # noqa: E402
from petra.methods import make_method  # noqa: E402
from petra.metrics import flops_per_token  # noqa: E402
from petra.model import build_model  # noqa: E402

GAP = 200


def hf_model(cfg):
    import transformers
    from petra.checkpoint import hf_config
    c = hf_config(cfg.model.__dict__, 0)
    c = {k: v for k, v in c.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hc = transformers.LlamaConfig(**c, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # created in bf16, as petra's: no fp32 copy at 7b
    try:
        with torch.device("cuda"):
            m = transformers.LlamaForCausalLM(hc)
    finally:
        torch.set_default_dtype(old)
    if cfg.model.activation_checkpointing:
        m.gradient_checkpointing_enable()
    return m.to(torch.bfloat16)


def hf_loss(model):
    def f(x, y):
        return model(input_ids=x, labels=y).loss  # HF shifts labels itself: pass inputs as labels
    return f


def build(impl: str, preset: str, rank: int, micro: int, batch: int = 64, gap: int = GAP, ckpt: bool = False,
          extra: dict | None = None):
    """Returns (step_fn(batches) -> None, refresh_every or None, config)."""
    name, _, mode = impl.partition(":")
    name, _, pad = name.partition("+")
    compile_ = mode == "compile"
    method = {"petra-full": "full", "petra-galore": "galore", "petra-galore8bit": "galore8bit",
              "petra-galore8bit-lw": "galore8bit", "petra-relora": "relora", "petra-galore-sub": "galore",
              "petra-galore8bit-lw-sub": "galore8bit", "petra-relora-int8": "relora",
              "petra-relora-nf4": "relora", "petra-full8bit": "full8bit"}.get(name, "full")
    ov = {"preset": preset, "method.name": method, "method.rank": rank, "train.batch_size": batch,
          "train.micro_batch_size": micro, "method.update_proj_gap": gap,
          "model.activation_checkpointing": ckpt}
    if pad:
        ov["model.pad_intermediate_to"] = 128
    ov.update(extra or {})
    if name.startswith("petra-relora-"):
        ov["method.quantize"] = name.rsplit("-", 1)[1]
    if name.endswith("-lw") or name.endswith("-lw-sub"):
        ov["method.layerwise"] = True
    if name.endswith("-sub"):
        ov["method.projector"] = "subspace"
    cfg = build_config(overrides=ov)
    accum = batch // micro

    if name.startswith("petra"):
        torch.manual_seed(0)
        model = build_model(cfg.model, "cuda", torch.bfloat16)
        m = make_method(cfg)
        if method == "relora":
            m.lora_phase = True
        model = m.prepare(model)
        opt = m.optimizer(model)
        fwd = torch.compile(model) if compile_ else model

        def step(batches):
            for j, (x, y) in enumerate(batches):
                m.before_backward(j == accum - 1)
                (fwd(x, y) / accum).backward()
            m.step(model, opt)
        return step, gap if method.startswith("galore") else None, cfg

    model = hf_model(cfg)
    if name == "hf-lora":
        import peft
        lc = peft.LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(model, lc)
        for n, p in model.named_parameters():  # embeddings, norms, head trainable, as in ReLoRA
            if "lora_" not in n and ("embed" in n or "norm" in n or "lm_head" in n):
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    refresh = None
    if name in ("hf-full", "hf-lora"):
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    elif name == "hf-adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    elif name.startswith("galore-torch"):
        import galore_torch
        low = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
        ids = {id(p) for p in low}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest}, {"params": low, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                                     "proj_type": "std"}]
        cls = galore_torch.GaLoreAdamW8bit if "8bit" in name else galore_torch.GaLoreAdamW
        opt = cls(groups, lr=1e-3)
        refresh = gap
    elif name == "apollo":  # APOLLO's recommended setting: random projection, channel-wise scaling
        import apollo_torch
        low = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
        ids = {id(p) for p in low}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest}, {"params": low, "rank": rank, "proj": "random", "scale_type": "channel",
                                     "scale": 1, "update_proj_gap": gap, "proj_type": "std"}]
        opt = apollo_torch.APOLLOAdamW(groups, lr=1e-3)
        refresh = gap
    else:
        raise ValueError(f"unknown impl {impl}")
    fwd = torch.compile(model) if compile_ else model
    loss = hf_loss(fwd)

    def step(batches):
        for x, y in batches:
            (loss(x, x) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, refresh, cfg


def measure(impl, preset, rank, micro, steps, warmup, batch=64, gap=GAP, ckpt=False, extra=None):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    step, refresh, cfg = build(impl, preset, rank, micro, batch, gap, ckpt, extra)
    g = torch.Generator(device="cuda").manual_seed(0)
    accum = batch // micro
    T = cfg.seq_len
    batches = [(torch.randint(0, cfg.model.vocab_size, (micro, T), device="cuda", generator=g),
                torch.randint(0, cfg.model.vocab_size, (micro, T), device="cuda", generator=g)) for _ in range(accum)]
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batches)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    first = times[0]
    steady = times[warmup:]
    med = statistics.median(steady)
    # the first step refreshed every projector (and compiled): time a refresh step separately
    refresh_s = None
    if refresh:
        # step counts so far = warmup + steps; run to the next refresh and time it
        n_done = warmup + steps
        while n_done % refresh:
            step(batches)
            n_done += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batches)
        torch.cuda.synchronize()
        refresh_s = time.perf_counter() - t0 - med
    amort = med + (refresh_s / refresh if refresh_s else 0.0)
    tokens = batch * T
    flops = flops_per_token(cfg.model, T) * tokens
    return {"impl": impl, "preset": preset, "rank": rank, "batch": batch, "micro_batch": micro,
            "activation_checkpointing": ckpt, "overrides": extra or {}, "median_ms": 1000 * med,
            "amortized_ms": 1000 * amort, "refresh_s": refresh_s, "first_step_s": first,
            "tokens_per_s": tokens / amort, "mfu": flops / amort / 989e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "setup_s": time.perf_counter() - t_build}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="60m")
    ap.add_argument("--impls", default="petra-full,hf-full")
    ap.add_argument("--ranks", default="60m=128,130m=256,350m=256,1b=512,7b=1024")
    ap.add_argument("--micro", default="60m=64,130m=64,350m=64,1b=32,7b=1")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (the papers' tables: 64)")
    ap.add_argument("--gap", type=int, default=GAP, help="projector refresh interval (update_proj_gap)")
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for petra impls, e.g. train.grad_clip=0")
    ap.add_argument("--out", default="bench.json")
    a = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in a.set)  # strings, cast by build_config as for the CLI
    ranks = dict(kv.split("=") for kv in a.ranks.split(","))
    micro = dict(kv.split("=") for kv in a.micro.split(","))
    rows = []
    for preset in a.presets.split(","):
        for impl in a.impls.split(","):
            try:
                r = measure(impl, preset, int(ranks[preset]), int(micro[preset]), a.steps, a.warmup,
                            a.batch, a.gap, a.ckpt, extra)
            except Exception as e:
                traceback.print_exc()
                r = {"impl": impl, "preset": preset, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            Path(a.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(ratios(rows))


def ratios(rows):
    """Amortized tokens/s of each petra impl over each peer of the same preset (>1: petra
    faster), with the peak-memory ratio (<1: petra smaller)."""
    ok = [r for r in rows if "error" not in r]
    out = ["| preset | petra impl | peer | speed ratio | memory ratio |", "|---|---|---|---|---|"]
    for r in ok:
        if not r["impl"].startswith("petra"):
            continue
        for q in ok:
            if q["preset"] == r["preset"] and not q["impl"].startswith("petra"):
                out.append(f"| {r['preset']} | {r['impl']} | {q['impl']} | {r['tokens_per_s'] / q['tokens_per_s']:.2f}x"
                           f" | {r['peak_gib'] / q['peak_gib']:.2f} |")
    return "\n".join(out)


def table(rows):
    out = ["| preset | impl | median ms | amortized ms | refresh s | tokens/s | MFU | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['preset']} | {r['impl']} | failed: {r['error'][:60]} | | | | | |")
            continue
        rs = f"{r['refresh_s']:.2f}" if r["refresh_s"] is not None else "-"
        out.append(f"| {r['preset']} | {r['impl']} | {r['median_ms']:.1f} | {r['amortized_ms']:.1f} | {rs} | "
                   f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
