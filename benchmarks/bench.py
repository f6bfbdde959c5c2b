"""Side-by-side GPU benchmark: petra's methods against the public peers, one process, one GPU.

    python benchmarks/bench.py --presets 60m,350m --impls petra-full,hf-full,petra-galore,galore-torch

Each implementation trains the same preset at the same batch (random tokens, bf16) for
--steps steps after --warmup; we report the median step time, the amortized step time with
the projector refresh (GaLore) included, tokens/s, MFU and peak memory, then ratios of each
petra implementation to each peer. Peers: Hugging Face LlamaForCausalLM (sdpa) with fused
torch AdamW (hf-full) or bitsandbytes AdamW8bit (hf-adamw8bit), galore-torch 1.0
(GaLoreAdamW / GaLoreAdamW8bit), APOLLO (apollo-torch 1.0.3, APOLLOAdamW) and peft LoRA.
Suffix an impl with ':compile' to torch.compile its model, with '+r128' to train at rank 128
(not --ranks'), with '+liger' to compute petra's norms, rotary embedding, SwiGLU and loss with
liger-kernel's Triton kernels (train.kernels), with '+pad' to pad the MLP width
to a multiple of 128 (both models: extra trained units), with '+nostack' to update the GaLore
family's norms one at a time (GaLoreOptimizer.stacks_vectors off), with '+fuse' to run APOLLO's
and Fira's element-wise update compiled (GaLoreOptimizer.fuses_update, off by default), with
'+noalign' to run petra's MLP at its own width (no zero units computed for alignment, model.aligned_pad).
petra-relora-int8 / -nf4 hold ReLoRA's frozen weights quantized by bitsandbytes.

Under torchrun, petra impls take '@ddp' or '@fsdp' (train.parallel) and the total --batch is
split over the processes, as in training. Variants for measuring: '@ddp-nosplit' compiles
one graph (torch._dynamo's optimize_ddp off); '@fsdp-keep' keeps the gathered weights from
forward to backward, '@fsdp-whole' compiles the whole FSDP2 model instead of each layer
and the loss, '@fsdp-u4' gathers 4 layers per FSDP2 unit:

    torchrun --nproc_per_node 2 benchmarks/bench.py --impls petra-full:compile@ddp,petra-full:compile@fsdp

Rows then report tokens/s in all and per GPU, the peak memory of the fullest GPU and the
optimizer state one process holds. --profile N prints torch.profiler's busiest operators
over N more steps of each impl (host and GPU time).
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
from petra import parallel as par_  # noqa: E402
from petra.compiling import compile_model  # noqa: E402
from petra.config import LOWRANK_METHODS, build_config  # noqa: E402
from petra.methods import make_method  # noqa: E402
from petra.metrics import (
    flops_per_token,  # noqa: E402
    optimizer_state_bytes,  # noqa: E402
)
from petra.train import new_model  # noqa: E402

DIST = par_.NoParallel()  # the process group under torchrun (set in main)

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
        with device():
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


CUDA = torch.cuda.is_available()  # without one, a smoke test of the script on CPU (no figures)


def device() -> torch.device:
    return torch.device("cuda", DIST.local_rank) if CUDA else torch.device("cpu")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def petra_config(impl, preset, rank, micro, batch=64, gap=GAP, ckpt=False, extra=None):
    """The RunConfig a petra impl name (e.g. petra-full+pad:compile) trains with."""
    name = impl.partition("@")[0].partition(":")[0]
    name, *suffixes = name.split("+")
    method = {
        "petra-full": "full",
        "petra-galore": "galore",
        "petra-galore8bit": "galore8bit",
        "petra-galore8bit-lw": "galore8bit",
        "petra-relora": "relora",
        "petra-galore-sub": "galore",
        "petra-galore8bit-lw-sub": "galore8bit",
        "petra-relora-int8": "relora",
        "petra-relora-nf4": "relora",
        "petra-full8bit": "full8bit",
        "petra-apollo": "apollo",
        "petra-apollo-mini": "apollo-mini",
        "petra-fira": "fira",
        "petra-muon": "muon",
        "petra-adam-mini": "adam-mini",
        "petra-galore-adafactor": "galore-adafactor",
    }.get(name, "full")
    ov = {
        "preset": preset,
        "method.name": method,
        "method.rank": 1 if method == "apollo-mini" else rank,
        "train.batch_size": batch,
        "train.micro_batch_size": micro,
        "method.update_proj_gap": gap,
        # all projectors refresh on one step, which `measure` times: amortized over the gap it
        # is the same work as refreshing them one by one (benchmarks/refresh_spread.py times that)
        "method.stagger_refresh": False,
        "model.activation_checkpointing": ckpt,
    }
    if "pad" in suffixes:
        ov["model.pad_intermediate_to"] = 128
    if "liger" in suffixes:
        ov["train.kernels"] = "liger"
    for s in suffixes:  # '+r128': this impl's rank instead of --ranks' (ReLoRA at the paper's rank)
        if s[:1] == "r" and s[1:].isdigit():
            ov["method.rank"] = int(s[1:])
    ov.update(extra or {})
    if name.startswith("petra-relora-"):
        ov["method.quantize"] = name.rsplit("-", 1)[1]
    if name.endswith("-lw") or name.endswith("-lw-sub"):
        ov["method.layerwise"] = True
    if name.endswith("-sub"):
        ov["method.projector"] = "subspace"
    return build_config(overrides=ov)


def build(
    impl: str,
    preset: str,
    rank: int,
    micro: int,
    batch: int = 64,
    gap: int = GAP,
    ckpt: bool = False,
    extra: dict | None = None,
):
    """Returns (step_fn(batches) -> None, whether it refreshes projectors every `gap` steps, config,
    optimizer)."""
    full_name = impl
    impl, _, par = impl.partition("@")
    pmode, *opts = par.split("-") if par else ("",)
    units = [int(o[1:]) for o in opts if o[:1] == "u" and o[1:].isdigit()]
    if pmode not in ("", "ddp", "fsdp") or any(
        o not in ("keep", "whole", "nosplit") and not o[:1] == "u" for o in opts
    ):
        raise ValueError(f"unknown parallel mode @{par}: use @ddp[-nosplit] or @fsdp[-keep][-whole][-uN]")
    if (par or DIST.world > 1) and not (DIST.active and par and impl.startswith("petra")):
        raise ValueError(
            f"{impl}@{par}: parallel modes are for petra impls under torchrun, and under "
            f"torchrun with several processes every impl needs one"
        )
    name, _, mode = impl.partition(":")
    compile_ = mode == "compile"
    cfg = petra_config(impl, preset, rank, micro, batch, gap, ckpt, extra)
    method = cfg.method.name
    name = name.partition("+")[0]

    if name.startswith("petra"):
        torch.manual_seed(0)
        model = new_model(cfg, device(), torch.bfloat16)  # with train.kernels
        if "+noalign" in impl:  # the MLP at its own width, as before aligned_pad
            for layer in model.model.layers:
                layer.mlp.pad = 0
        d = par_.strategy(
            pmode if par else "none",
            DIST.rank,
            DIST.world,
            DIST.local_rank,
            unit_layers=units[0] if units else 1,
            reshard_after_forward="keep" not in opts,
        )
        m = make_method(cfg, d)
        if method == "relora":
            m.lora_phase = True
        model = m.prepare(model)
        wrapped = d.wrap(model, device())
        if DIST.main and par:  # what runs: FSDP2 classes are named FSDP<model class>
            print(f"{full_name}: {type(wrapped).__name__} on {DIST.world} process(es)", flush=True)
        opt = m.optimizer(model)
        if "+nostack" in impl:  # the plain group's norms one at a time, as before they stacked
            opt.stacks_vectors = False
        if "+fuse" in impl:  # APOLLO's and Fira's element-wise update compiled (off by default)
            opt.fuses_update = ("cuda",)
        import torch._dynamo.config as dynamo_config

        dynamo_config.optimize_ddp = "nosplit" not in opts  # DDP: one graph, no bucket-sized pieces
        by_layer = (d.compile_by_layer or m.layerwise is not None) and "whole" not in opts
        # as the training loop compiles
        fwd = compile_model(wrapped, lambda *a: None, parts_of=model if by_layer else None) if compile_ else wrapped

        def step(batches):
            for j, (x, y) in enumerate(batches):
                last = j == len(batches) - 1
                m.before_backward(last)
                with d.grad_sync(wrapped, last):
                    (fwd(x, y) / len(batches)).backward()
            m.step(model, opt)

        return step, method in LOWRANK_METHODS, cfg, opt

    model = hf_model(cfg)
    if name == "hf-lora":
        import peft

        lc = peft.LoraConfig(
            r=rank,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model = peft.get_peft_model(model, lc)
        for n, p in model.named_parameters():  # embeddings, norms, head trainable, as in ReLoRA
            if "lora_" not in n and ("embed" in n or "norm" in n or "lm_head" in n):
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    refresh = False
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
        groups = [
            {"params": rest},
            {"params": low, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
        ]
        cls = galore_torch.GaLoreAdamW8bit if "8bit" in name else galore_torch.GaLoreAdamW
        opt = cls(groups, lr=1e-3)
        refresh = True
    elif name in ("apollo", "apollo-mini", "fira"):  # the packages' recommended settings
        low = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
        ids = {id(p) for p in low}
        group = {"params": low, "update_proj_gap": gap, "proj_type": "std"}
        if name == "fira":
            import fira

            cls = fira.FiraAdamW
            group.update(rank=rank, alpha=0.25)
        else:  # APOLLO: random projection, channel-wise scaling; Mini: rank 1, tensor-wise, scale 128
            import apollo_torch

            cls = apollo_torch.APOLLOAdamW
            mini = name == "apollo-mini"
            group.update(proj="random", rank=1 if mini else rank, scale_type="tensor" if mini else "channel")
            group["scale"] = 128 if mini else 1
        opt = cls([{"params": [p for p in params if id(p) not in ids]}, group], lr=1e-3)
        refresh = True
    else:
        raise ValueError(f"unknown impl {impl}")
    fwd = torch.compile(model) if compile_ else model
    loss = hf_loss(fwd)

    def step(batches):
        for x, y in batches:
            (loss(x, x) / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, refresh, cfg, opt


def measure(impl, preset, rank, micro, steps, warmup, batch=64, gap=GAP, ckpt=False, extra=None, profile=0):
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    # the optimizer refreshes its projectors every warmup + steps updates, so that the step
    # after the timed ones is a refresh (no run up to step `gap`); `gap` amortizes its cost
    step, refresh, cfg, opt = build(impl, preset, rank, micro, batch, warmup + steps, ckpt, extra)
    g = torch.Generator(device=device()).manual_seed(DIST.rank)
    rows = batch // DIST.world  # this process's rows of each step, micro at a time
    if batch % DIST.world or rows % micro:
        raise ValueError(f"batch {batch} does not split into {DIST.world} processes x micro-batches of {micro}")
    T = cfg.seq_len
    batches = [
        (
            torch.randint(0, cfg.model.vocab_size, (micro, T), device=device(), generator=g),
            torch.randint(0, cfg.model.vocab_size, (micro, T), device=device(), generator=g),
        )
        for _ in range(rows // micro)
    ]
    times, enqueue = [], []  # enqueue: until the host has issued the step (about the step: host-bound)
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step(batches)
        enqueue.append(time.perf_counter() - t0)
        sync()
        times.append(time.perf_counter() - t0)
    first = times[0]
    steady = times[warmup:]
    med = statistics.median(steady)
    # the first step refreshed every projector (and compiled): time the next refresh step
    # separately. Two steps are timed, in case a peer counts steps from 1 instead of 0.
    refresh_s = None
    if refresh:
        probe = []
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            step(batches)
            sync()
            probe.append(time.perf_counter() - t0)
        refresh_s = max(probe) - med
    amort = med + (refresh_s / gap if refresh_s else 0.0)
    tokens = batch * T
    flops = flops_per_token(cfg.model, T) * tokens
    used = torch.cuda.max_memory_allocated() if CUDA else 0
    peak = DIST.all_reduce(torch.tensor(float(used), device=device()), par_.dist.ReduceOp.MAX)
    if profile:
        show_profile(step, batches, profile, impl, 1000 * med)
    return {
        "impl": impl,
        "preset": preset,
        "rank": cfg.method.rank,
        "batch": batch,
        "micro_batch": micro,
        "gpus": DIST.world,
        "activation_checkpointing": ckpt,
        "overrides": extra or {},
        "median_ms": 1000 * med,
        "enqueue_ms": 1000 * statistics.median(enqueue[warmup:]),
        "amortized_ms": 1000 * amort,
        "refresh_s": refresh_s,
        "first_step_s": first,
        "tokens_per_s": tokens / amort,
        "tokens_per_s_per_gpu": tokens / amort / DIST.world,
        "mfu": flops / amort / 989e12 / DIST.world,
        "peak_gib": float(peak) / 2**30,
        "optimizer_state_mib": optimizer_state_bytes(opt) / 2**20,
        "setup_s": time.perf_counter() - t_build,
    }


def show_profile(step, batches, n: int, impl: str, step_ms: float) -> None:
    """torch.profiler over n steps: the operators with the most host time, then GPU time, then
    GPU kernel time by kind against the unprofiled step (the rest is the GPU waiting: on the
    host, where the step is host-bound)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(batches)
        sync()
    if DIST.main:
        avg = prof.key_averages()
        print(f"== profile of {impl}, {n} steps: host time ==")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
        print(f"== profile of {impl}: GPU time ==")
        print(avg.table(sort_by=key, row_limit=12, max_name_column_width=60), flush=True)
        print(f"== profile of {impl}: GPU kernel time per step by kind (ms) ==")
        kinds, busy = kernel_kinds(prof.events(), n)
        print(kinds)
        print(f"{'idle':10s} {step_ms - busy:8.2f} of the unprofiled {step_ms:.2f} ms step", flush=True)


# GPU kernels by what their names say they do, first match wins (Inductor's own kernels are
# "triton_..."; liger-kernel's Triton kernels are named for their operation)
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("liger", ("rms_norm", "rope", "swiglu", "cross_entropy", "element_mul")),
    ("inductor", ("triton_",)),
    ("copy/fill", ("copy", "memset", "fill", "memcpy", "cat")),
)


def kernel_kinds(events, steps: int) -> tuple[str, float]:
    """'kind ms' per step for each kind of GPU kernel in a profile, the 8 busiest "other"
    kernels named, and the whole; and the whole's ms."""
    from torch.autograd import DeviceType

    ms, other = {}, {}
    for e in events:
        # (ranges the host annotated, e.g. "Optimizer.step#...", also show on the GPU's timeline:
        # they span kernels counted on their own)
        if e.device_type != DeviceType.CUDA or e.name.startswith(("Optimizer.", "## ", "ProfilerStep")):
            continue
        t = e.device_time_total / 1000 / steps
        name = e.name.lower()
        kind = next((k for k, keys in KINDS if any(w in name for w in keys)), "other")
        ms[kind] = ms.get(kind, 0.0) + t
        if kind == "other":
            other[e.name[:60]] = other.get(e.name[:60], 0.0) + t
    lines = [f"{k:10s} {v:8.2f}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1])]
    lines += [f"  other: {v:7.2f} {k}" for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:8]]
    busy = sum(ms.values())
    return "\n".join(lines + [f"{'all':10s} {busy:8.2f}"]), busy


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
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override for petra impls, e.g. train.grad_clip=0",
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps of each impl")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the table and ratios of these bench outputs")
    a = ap.parse_args()
    if a.merge:
        rows = [r for f in a.merge for r in json.loads(Path(f).read_text())]
        done = {(r["preset"], r["impl"]) for r in rows if "error" not in r}  # a failure measured again later
        rows = [r for r in rows if "error" not in r or (r["preset"], r["impl"]) not in done]
        print(table(rows))
        print(ratios(rows))
        return
    global DIST
    if par_.launched():
        DIST = par_.setup("ddp", "cuda" if CUDA else "cpu")
    extra = dict(kv.split("=", 1) for kv in a.set)  # strings, cast by build_config as for the CLI
    ranks = dict(kv.split("=") for kv in a.ranks.split(","))
    micro = dict(kv.split("=") for kv in a.micro.split(","))
    rows = []
    for preset in a.presets.split(","):
        for impl in a.impls.split(","):
            try:
                r = measure(
                    impl,
                    preset,
                    int(ranks[preset]),
                    int(micro[preset]),
                    a.steps,
                    a.warmup,
                    a.batch,
                    a.gap,
                    a.ckpt,
                    extra,
                    a.profile,
                )
            except Exception as e:
                traceback.print_exc()
                r = {"impl": impl, "preset": preset, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
            if DIST.main:
                print(json.dumps(r), flush=True)
                Path(a.out).write_text(json.dumps(rows, indent=1))
    if DIST.main:
        print(table(rows))
        print(ratios(rows))
    if DIST.active:
        par_.dist.destroy_process_group()


# what each petra impl is compared with (by base name: ':compile', '+pad', '@...' stripped);
# GaLore is also set against petra's own full rank (the "within 10%")
PEERS = {
    "petra-full": ("hf-full", "hf-adamw8bit"),
    "petra-full8bit": ("hf-adamw8bit",),
    "petra-galore": ("galore-torch", "apollo", "petra-full"),
    "petra-galore8bit": ("galore-torch-8bit", "hf-adamw8bit", "petra-full"),
    "petra-galore8bit-lw": ("galore-torch-8bit", "petra-full"),
    "petra-apollo": ("apollo", "petra-full"),
    "petra-apollo-mini": ("apollo-mini", "petra-full"),
    "petra-fira": ("fira", "petra-full"),
    "petra-muon": ("petra-full",),  # petra's Muon is torch.optim.Muon's: no other peer
    "petra-adam-mini": ("petra-full",),  # petra's Adam-mini (the package's update, bit for bit)
    "petra-galore-adafactor": ("petra-full",),
    "petra-relora": ("hf-lora",),
    "petra-relora-int8": ("hf-lora",),
    "petra-relora-nf4": ("hf-lora",),
}


def base(impl: str) -> str:
    return impl.split("@")[0].split(":")[0].split("+")[0]


def ratios(rows):
    """Amortized tokens/s of each petra impl over each of its peers (PEERS) of the same
    preset, eager and compiled (>1: petra faster), with the peak-memory ratio (<1: petra
    smaller)."""
    ok = [r for r in rows if "error" not in r]
    out = ["| preset | petra impl | peer | speed ratio | memory ratio |", "|---|---|---|---|---|"]
    ok = [r for r in ok if "@" not in r["impl"]]  # parallel variants: compared with their plain run
    for r in ok:
        for q in ok:
            same = q["preset"] == r["preset"] and q["micro_batch"] == r["micro_batch"]
            if same and base(q["impl"]) in PEERS.get(base(r["impl"]), ()):
                mem = f"{r['peak_gib'] / q['peak_gib']:.2f}" if q["peak_gib"] else "-"
                out.append(
                    f"| {r['preset']} | {r['impl']} | {q['impl']} | "
                    f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x | {mem} |"
                )
    return "\n".join(out)


def table(rows):
    out = [
        "| preset | impl | GPUs | micro-batch | median ms | host ms | amortized ms | refresh s | tokens/s | "
        "tokens/s/GPU | MFU | peak GiB/GPU | opt. state MiB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['preset']} | {r['impl']} | | | failed: {r['error'][:60]} | | | | | | | | |")
            continue
        rs = f"{r['refresh_s']:.2f}" if r["refresh_s"] is not None else "-"
        host = f"{r['enqueue_ms']:.1f}" if "enqueue_ms" in r else "-"
        out.append(
            f"| {r['preset']} | {r['impl']} | {r.get('gpus', 1)} | {r.get('micro_batch', '')} | "
            f"{r['median_ms']:.1f} | {host} | "
            f"{r['amortized_ms']:.1f} | {rs} | {r['tokens_per_s']:,.0f} | "
            f"{r.get('tokens_per_s_per_gpu', r['tokens_per_s']):,.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_gib']:.1f} | {r.get('optimizer_state_mib', float('nan')):.0f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
