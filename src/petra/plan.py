"""`petra plan`: which methods and settings pre-train a preset on a GPU of a given memory.

Every combination of method, micro-batch, layer-wise updates and activation checkpointing
is estimated with the analytic model (memory.breakdown_gib); those that fit are ordered by
their expected cost. On a CUDA machine each method's cheapest fitting setting is then
probed: a few real training steps on random tokens, in a child process whose allocator is
capped at the budget, so the user's card is emulated on a larger one. A probe that runs out
of memory moves on to that method's next setting; the measured peak and tokens/s replace
the estimate and the order.

    python -m petra.plan CONFIG.json CAP_GIB    (the child: one probe, a JSON line out)
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from .config import ConfigError, RunConfig, build_config, from_dict
from .memory import breakdown_gib

# CUDA context, kernels and cuBLAS handles live outside torch's allocator
CONTEXT_GIB = 0.5
# the analytic estimate has been up to 17.5% under a measured peak (docs/plan.md): without a
# probe to confirm, a setting fits only with this much to spare
ESTIMATE_MARGIN = 0.10
PROBE_STEPS = 4  # the first compiles and refreshes projectors; the rest are timed
TOKENS_HALF_SPEED = 2048


def parse_gib(text: str) -> float:
    """'24GiB', '24G', '16GB', '512MiB' or a bare number of GiB -> GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    units = {"": 1, "g": 1, "gib": 1, "gb": 1e9 / 2**30, "m": 1 / 1024, "mib": 1 / 1024, "mb": 1e6 / 2**30}
    if not m or m.group(2).lower() not in units:
        raise ConfigError(f"--gpu-mem {text!r} must be a size such as 24GiB, 16GB or 80 (GiB)")
    gib = float(m.group(1)) * units[m.group(2).lower()]
    if gib <= CONTEXT_GIB:
        raise ConfigError(f"--gpu-mem {text!r} leaves nothing beside the CUDA context ({CONTEXT_GIB} GiB)")
    return gib


@dataclass
class Candidate:
    cfg: RunConfig
    estimate: dict  # memory.breakdown_gib, per GPU
    probe: dict = field(default_factory=dict)  # peak_gib, reserved_gib, step_ms, tokens_per_s or error
    gpus: int = 1  # processes under torchrun (the cfg's train.parallel says how)

    @property
    def method(self) -> str:
        return self.cfg.method.name

    def needs_gib(self, margin: float = ESTIMATE_MARGIN) -> float:
        """The estimate with a margin and the CUDA context: what the GPU must have."""
        return self.estimate["total"] * (1 + margin) + CONTEXT_GIB

    @property
    def no_clip(self) -> bool:
        """Layer-wise without clipping: a memory setting, not the user's recipe."""
        return self.cfg.method.layerwise and self.cfg.train.grad_clip == 0

    @property
    def settings(self) -> str:
        c = self.cfg
        parts = [f"{'FSDP2' if c.train.parallel == 'fsdp' else 'DDP'} on {self.gpus} GPUs"] if self.gpus > 1 else []
        parts.append(f"micro-batch {c.micro_batch}")
        if c.method.layerwise:
            parts.append("layer-wise")
        if c.model.activation_checkpointing:
            parts.append("checkpointing")
        if self.no_clip:
            parts.append("no clipping")
        if self.int8:
            parts.append("int8 weights")
        return ", ".join(parts)

    @property
    def int8(self) -> bool:
        return self.cfg.method.int8_weights != "off"

    def cost(self) -> tuple:
        """Expected relative step time without a GPU to measure (a rough model; the probe
        measures): checkpointing recomputes the forward (+1/3), layer-wise updates run
        parameter by parameter (+10%), and a micro-batch of few tokens leaves the GPU idle
        (half speed at TOKENS_HALF_SPEED tokens per forward). Dropping clipping costs nothing
        in speed but changes the training, so it only breaks ties. int8 weights come last of
        all: they round every update (and run eagerly), so they are for what fits no other way."""
        c = self.cfg
        t = (4 / 3 if c.model.activation_checkpointing else 1.0) * (1.1 if c.method.layerwise else 1.0)
        t *= 1 + TOKENS_HALF_SPEED / (c.micro_batch * c.seq_len)
        return (self.int8, round(t, 6), self.no_clip)

    def command(self) -> str:
        c = self.cfg
        launch = f"torchrun --nproc_per_node {self.gpus} -m petra train" if self.gpus > 1 else "petra train"
        args = [f"{launch} --preset {c.preset} --method {c.method.name}", f"--batch-size {c.train.batch_size}"]
        if c.train.parallel == "fsdp":
            args.append("--set train.parallel=fsdp")
        if c.micro_batch != c.train.batch_size:
            args.append(f"--micro-batch-size {c.micro_batch}")
        if c.train.seq_len:
            args.append(f"--seq-len {c.train.seq_len}")
        if c.method.layerwise:
            args.append("--layerwise")
        if self.no_clip:
            args.append("--grad-clip 0")
        if c.model.activation_checkpointing:
            args.append("--set model.activation_checkpointing=true")
        if self.int8:
            args.append(f"--set method.int8_weights={c.method.int8_weights}")
        return " ".join(args + ["--data DATA --out RUN_DIR"])


def _configs(
    base: dict, method: str, micro: int, layerwise: bool, ckpt: bool, gpus: int = 1, mode: str = "none"
) -> list[RunConfig]:
    """The candidate's configs that the method accepts (under `mode` on `gpus` processes).
    Layer-wise updates also come without clipping, which keeps no gradient until backward
    ends (APOLLO and Fira only so); the low-rank methods on one GPU also with int8 weights."""
    from .methods import make_method
    from .parallel import strategy

    ov = {
        **base,
        "method.name": method,
        "train.micro_batch_size": micro,
        "method.layerwise": layerwise,
        "model.activation_checkpointing": ckpt,
        **({"train.parallel": mode} if gpus > 1 else {}),
    }
    out = []
    clips = ({}, {"train.grad_clip": 0.0}) if layerwise else ({},)
    for extra in [{**c, **w} for w in ({}, {"method.int8_weights": "stochastic"}) for c in clips]:
        try:
            cfg = build_config(overrides={**ov, **extra})
            make_method(cfg, strategy(mode, 0, gpus) if gpus > 1 else None).check()
        except ConfigError:
            continue
        if cfg not in out:  # the user's clip may be 0 already
            out.append(cfg)
    return out


def candidates(base: dict, methods: list[str], micro_batches: list[int], gpus: int = 1) -> list[Candidate]:
    """Every setting of every method (on several GPUs: under DDP and FSDP2), estimated per GPU."""
    out = []
    for method in methods:
        for mode in ("ddp", "fsdp") if gpus > 1 else ("none",):
            for ckpt in (False, True):
                for layerwise in (False, True):
                    for micro in micro_batches:
                        out += [
                            Candidate(c, breakdown_gib(c, gpus=gpus, mode=mode), gpus=gpus)
                            for c in _configs(base, method, micro, layerwise, ckpt, gpus, mode)
                        ]
    return out


def micro_batches(batch: int, micro: int | None) -> list[int]:
    if micro:
        if batch % micro:
            raise ConfigError(f"--micro-batch-size {micro} must divide --batch-size {batch}")
        return [micro]
    return [m for m in (2**k for k in range(batch.bit_length(), -1, -1)) if m <= batch and batch % m == 0]


def fitting(cands: list[Candidate], budget_gib: float, margin: float) -> dict[str, list[Candidate]]:
    """Per method, the candidates whose estimate fits, cheapest first."""
    out: dict[str, list[Candidate]] = {}
    for c in sorted(cands, key=Candidate.cost):
        if c.needs_gib(margin) <= budget_gib:
            out.setdefault(c.method, []).append(c)
    return out


# -- probing ------------------------------------------------------------------------------


class RandomBatches:
    """Token batches drawn from a seeded generator, one per step (a probe needs no corpus)."""

    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.batch, self.seq = vocab, batch, seq

    def get(self, step: int, rows: slice):
        g = torch.Generator().manual_seed(step)
        t = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=g)[rows]
        return t[:, :-1], t[:, 1:]


def probe(cfg: RunConfig, cap_gib: float | None = None, steps: int = PROBE_STEPS) -> dict:
    """A few training steps of `cfg` on random tokens, on its device (on CUDA with the
    allocator capped at `cap_gib`): the peak memory (allocated and reserved; on a CPU the
    process's RSS), the median step time after the first, tokens/s."""
    from .methods import make_method
    from .metrics import peak_memory_gib
    from .model import count_parameters
    from .parallel import NoParallel
    from .train import Run, _forward, new_model, resolve_device, train_step

    device, dtype = resolve_device(cfg)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        if cap_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    one = NoParallel()
    method = make_method(cfg, one)
    model = method.prepare(new_model(cfg, device, dtype))
    optimizer = method.optimizer(model)
    B = cfg.train.batch_size
    run = Run(
        cfg, None, one, device, dtype, None, RandomBatches(cfg.model.vocab_size, B, cfg.seq_len), [],
        method, model, model, model, optimizer, 0, False, count_parameters(model), "", B, cfg.micro_batch,
    )  # fmt: skip
    run.forward = _forward(run, lambda *a: None)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(run, None)
        end = method.on_step_end(run.step, run.model, run.optimizer)
        run.model, run.optimizer = end.model, end.optimizer
        run.step += 1
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[1:] or times) * 1e3
    peak = peak_memory_gib(device)
    return {
        "peak_gib": peak,
        "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else peak,
        "step_ms": ms,
        "tokens_per_s": B * cfg.seq_len / (ms / 1e3),
    }


def probe_in_child(cfg: RunConfig, cap_gib: float, timeout: float = 900) -> dict:
    """`probe` in a fresh process: an out-of-memory leaves nothing behind, and each probe
    starts from an empty allocator and compile cache."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "petra.plan", cfg.to_json(), str(cap_gib)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout:.0f}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {tail}"}


def _child(argv: list[str]) -> int:
    cfg, cap = from_dict(json.loads(argv[0])), float(argv[1])
    try:
        result = probe(cfg, cap)
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    except Exception as e:  # anything else a real run would also hit: report it, do not hide it
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    gc.collect()
    print(json.dumps(result), flush=True)
    return 0


# -- the plan ------------------------------------------------------------------------------


def make_plan(
    base: dict,
    methods: list[str],
    budget_gib: float,
    micro: int | None = None,
    probe_on: bool = False,
    tries: int = 3,
    log=print,
    gpus: int = 1,
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """The best setting per method, fastest first, and (method, why) for those that do not fit.
    On `gpus` GPUs, each process takes batch / gpus rows, and budget_gib is one GPU's."""
    batch = build_config(overrides=base).train.batch_size
    if gpus < 1 or batch % gpus:
        raise ConfigError(f"--gpus {gpus} must be at least 1 and divide --batch-size {batch}")
    cands = candidates(base, methods, micro_batches(batch // gpus, micro), gpus)
    margin = 0.0 if probe_on else ESTIMATE_MARGIN  # a probe confirms or refutes each estimate
    fits = fitting(cands, budget_gib, margin)
    missing = []
    for m in methods:
        mine = [c for c in cands if c.method == m]
        if not mine:
            missing.append((m, "refused in every setting (see `petra train --method " + m + "`)"))
        elif m not in fits:
            low = min(mine, key=lambda c: c.estimate["total"])
            missing.append((m, f"needs about {low.needs_gib(margin):.1f} GiB at best ({low.settings})"))
    chosen = []
    for m, options in fits.items():
        if not probe_on:
            chosen.append(options[0])
            continue
        for c in options[:tries]:
            log(f"probing {m} ({c.settings}, estimate {c.needs_gib(0):.1f} GiB) ...")
            c.probe = probe_in_child(c.cfg, budget_gib - CONTEXT_GIB)
            if "error" not in c.probe:
                chosen.append(c)
                break
            log(f"  {c.probe['error']}")
        else:
            missing.append((m, f"its {min(tries, len(options))} cheapest settings failed on this GPU"))
    if probe_on:
        chosen.sort(key=lambda c: -c.probe["tokens_per_s"])
    else:
        chosen.sort(key=Candidate.cost)
    return chosen, missing


def main(argv: list[str] | None = None) -> int:
    return _child(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
