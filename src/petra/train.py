"""Training: `setup` builds a `Run`, `train_step` makes one optimizer step, `loop` runs the
steps and lets its components (checkpointer, validator, log, health) decide their timing.

The loop knows no method and no parallel mode: it asks the method (methods/) for the
learning-rate factor, the update and the step-end hook, and the parallel strategy
(parallel.py) for gradient sync, wrapping and saving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint, hf, reshard
from .checkpoint import Checkpointer
from .compiling import compile_model
from .config import ConfigError, RunConfig, config_changes, from_dict, merge_resume_config, replace
from .data import Batches, TokenData, prepare, val_batches
from .generate import Sampler
from .health import Health, TrainingError, perplexity
from .hf import TOKENIZER_FILES
from .int8weights import quantized_parameters, quantizer
from .kernels import kernels
from .methods import Method, make_method
from .metrics import TrainLog, flops_per_token, optimizer_state_bytes, peak_memory_gib
from .model import LlamaForCausalLM, build_model, count_parameters
from .parallel import NoParallel
from .parallel import setup as setup_parallel
from .prepare import file_sha256
from .rundir import RunDirectory, run_entry
from .schedule import set_lr
from .signals import StopRequest
from .trackers import Trackers, check_installed, open_trackers
from .validation import Validator


def resolve_device(cfg: RunConfig, local_rank: int | None = None) -> tuple[torch.device, torch.dtype]:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={cfg.train.device!r} but no CUDA device is available; use cpu or auto")
    if want == "cuda" and local_rank is not None:  # torchrun: one GPU per process
        want = f"cuda:{local_rank}"
    device = torch.device(want)
    if cfg.train.kernels == "liger" and device.type != "cuda":
        raise ConfigError(f"train.kernels=liger runs Triton kernels on CUDA, not on {want}; use train.kernels=torch")
    dt = cfg.train.dtype
    if dt == "auto":
        dt = "bf16" if device.type == "cuda" else "fp32"
    return device, torch.bfloat16 if dt == "bf16" else torch.float32


def new_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The run's LLaMA, initialized from the seed drawn before: in `dtype` on `device`, its
    hidden matrices in int8 where method.int8_weights asks, computing with train.kernels."""
    model = build_model(cfg.model, device, dtype, quantizer(cfg.method.int8_weights, cfg.method.int8_block))
    if cfg.train.kernels != "torch":
        model.use_kernels(kernels(cfg.train.kernels))
    return model


@dataclass
class Run:
    """Everything a started (or resumed) run holds."""

    cfg: RunConfig
    out: Path
    parallel: NoParallel
    device: torch.device
    dtype: torch.dtype
    data: TokenData
    batches: Batches
    val_batches: list
    method: Method
    model: torch.nn.Module  # the LlamaForCausalLM (its parameters are the optimizer's)
    wrapped: torch.nn.Module  # what forward and backward run on (DDP around the model, or the model)
    forward: object  # wrapped, compiled or not
    optimizer: torch.optim.Optimizer
    step: int
    resumed: bool
    n_params: int
    tokenizer_sha256: str
    rows: int  # this process's rows of each global batch
    micro_batch: int  # rows per forward

    @property
    def accum(self) -> int:
        return self.rows // self.micro_batch

    @property
    def last_step(self) -> int:
        t = self.cfg.train
        return min(t.stop_after or t.steps, t.steps)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.seq_len

    def rewrap(self, log) -> None:
        """After the method changed the set of trainable parameters."""
        wrapped = self.parallel.rewrap(self.model, self.wrapped, self.device)
        if wrapped is not self.wrapped:
            self.wrapped = wrapped
            self.forward = _forward(self, log)

    def state(self) -> dict:
        """What a checkpoint holds: everything needed to continue exactly."""
        device = self.device
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data_fingerprint": self.data.fingerprint,
            "tokenizer_path": str(self.data.tokenizer.path),
            "tokenizer_sha256": self.tokenizer_sha256,
            "eos_id": self.data.tokenizer.eos_id,
        }


def _forward(run: Run, log):
    t = run.cfg.train
    if not (t.compile == "on" or (t.compile == "auto" and run.device.type == "cuda")):
        return run.wrapped
    if run.cfg.method.int8_weights != "off":  # (compile=on is refused by the config)
        log("int8 weights: the model runs eagerly")
        return run.wrapped
    by_layer = run.parallel.compile_by_layer or run.method.layerwise is not None
    return compile_model(run.wrapped, log, parts_of=run.model if by_layer else None)


def train(
    cfg: RunConfig | None,
    out: str | Path,
    resume: bool = False,
    explicit: set | None = None,
    show_progress: bool = True,
    log=print,
) -> dict:
    """Train (or resume) a run in directory `out`; returns a summary dict.

    Launched by torchrun, every process runs this function: each takes its rows of every
    global batch, DDP or FSDP2 combines the gradients, and only rank 0 writes and prints.
    """
    out, explicit = Path(out), explicit or set()
    if resume and not checkpoint.exists(out):
        what = "does not exist" if not out.exists() else "holds no checkpoint.pt"
        raise ConfigError(
            f"--resume {out}: the directory {what}; a run to resume is a directory written "
            f"by petra train that saved a checkpoint"
        )
    # the process group comes first (a sharded checkpoint is read per process); on resume its
    # mode and device come from the run's config.json as the request amends it
    pre = cfg
    if resume:
        pre = merge_resume_config(from_dict(checkpoint.run_config(out, log)), cfg, explicit)
        if (done := _finished(out, pre)) is not None:
            log(f"{out} finished its {pre.train.steps} steps earlier: nothing to train, nothing changed")
            return done
    parallel = (
        setup_parallel(pre.train.parallel, resolve_device(pre)[0].type, unit_layers=pre.train.fsdp_unit_layers)
        if pre is not None
        else NoParallel()
    )
    if not parallel.main:
        log, show_progress = (lambda *a, **k: None), False
    # rank 0 holds the directory for the whole run; the lock comes before any other work
    ours = None if resume else run_entry  # a new run never writes into a folder of the user's
    with RunDirectory(out, "--resume" if resume else "--out", lock=parallel.main, ours=ours):
        run = setup(cfg, out, resume, explicit, parallel, log, show_progress)
        return loop(run, log, show_progress)


def _adopt_hf(cfg: RunConfig, log) -> RunConfig:
    """A run started from a Hugging Face Llama (not a petra run) takes its architecture, and
    its tokenizer unless data.tokenizer names one."""
    path = Path(cfg.train.init_from).expanduser()
    if checkpoint.exists(path) or not hf.is_hf(path):
        return cfg
    fields, tok = hf.model_fields(path), hf.tokenizer(path)
    changes = {"model": fields}
    if tok is not None and not cfg.data.tokenizer:
        changes["data"] = {"tokenizer": str(tok)}
    log(
        f"starting from {path}: its LLaMA ({fields['num_hidden_layers']} layers of {fields['hidden_size']}, "
        f"vocabulary {fields['vocab_size']}, context {fields['max_position_embeddings']})"
        + (f" and its tokenizer {tok.name}" if "data" in changes else "")
    )
    return replace(cfg, **changes)


def _same_tokenizer(source: Path, sha: str) -> None:
    """Weights to start from must come with this run's tokenizer: the same size is not enough
    (token 17 would mean another piece of text to every embedding row)."""
    theirs = next((source / f for f in TOKENIZER_FILES if (source / f).is_file()), None)
    if theirs is not None and file_sha256(theirs) != sha:
        raise ConfigError(
            f"train.init_from={str(source)!r} was trained with another tokenizer ({theirs}) than this run's; "
            f"give its tokenizer as --tokenizer {theirs}, or start from weights made with this one"
        )


def _finished(out: Path, cfg: RunConfig) -> dict | None:
    """The summary of a run that already finished its schedule (a resume changes nothing)."""
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if s.get("status") == "finished" and s.get("step") == cfg.train.steps else None


def setup(
    cfg: RunConfig | None, out: Path, resume: bool, explicit: set, parallel: NoParallel, log, show_progress: bool
) -> Run:
    """Checks, data, model, method, optimizer and saved state: a run ready for its next step."""
    payload = None
    if resume:
        payload = parallel.load(out)
        on_disk = checkpoint.run_config(out, lambda m: None)
        # both as this version reads them: a field added since takes its old value in each
        if differ := config_changes(from_dict(on_disk).to_dict(), from_dict(payload["config"]).to_dict()):
            raise ConfigError(
                f"{out}/{checkpoint.CKPT} was not saved by the run its config.json describes ({', '.join(differ[:4])}"
                f"{', ...' if len(differ) > 4 else ''}); a checkpoint copied from another run is not resumed"
            )
        cfg = merge_resume_config(from_dict(payload["config"]), cfg, explicit)
    elif checkpoint.exists(out):
        raise ConfigError(
            f"{out} already holds a run (a checkpoint); resume it with --resume {out} or choose another --out"
        )
    if payload is None and cfg.train.init_from:
        cfg = _adopt_hf(cfg, log)
    method = make_method(cfg, parallel)  # the method's checks come before any work
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_installed(cfg.train.log_to)
    B = cfg.train.batch_size
    rows = B // parallel.world
    mb = cfg.train.micro_batch_size or rows
    if B % parallel.world or rows % mb:
        raise ConfigError(
            f"train.batch_size={B} must split into {parallel.world} processes x a whole number of "
            f"micro-batches of train.micro_batch_size={cfg.train.micro_batch_size}"
        )
    device, dtype = resolve_device(cfg, parallel.local_rank if parallel.active else None)
    init = checkpoint.initial_weights(cfg.train.init_from) if cfg.train.init_from and payload is None else None
    if payload is not None and cfg.data.tokenizer and payload.get("tokenizer_sha256"):
        # before any tokenizing: a swapped --tokenizer would otherwise re-tokenize the corpus first
        if file_sha256(Path(cfg.data.tokenizer).expanduser()) != payload["tokenizer_sha256"]:
            raise ConfigError(
                f"data.tokenizer {cfg.data.tokenizer!r} is not the tokenizer this run trained with (its sha256 "
                f"differs from the one its checkpoint recorded); restore that file to resume {out}"
            )

    # data first: the cheap checks (missing files, empty corpus) fail before any model exists.
    # Rank 0 fills the token cache while the others wait, then they read it.
    if not parallel.main:
        parallel.barrier()
    data = prepare(cfg.data, cfg.model.vocab_size, log=log, show_progress=show_progress)
    if parallel.main:
        parallel.barrier()
    if data.vocab_size > cfg.model.vocab_size:
        log(f"tokenizer has {data.vocab_size} tokens: model.vocab_size {cfg.model.vocab_size} -> {data.vocab_size}")
        cfg.model.vocab_size = data.vocab_size
    tokenizer_sha = file_sha256(data.tokenizer.path)
    if init is not None:
        _same_tokenizer(Path(cfg.train.init_from).expanduser(), tokenizer_sha)
    if payload is not None and payload.get("data_fingerprint") != data.fingerprint:
        what = "tokenizer" if payload.get("tokenizer_sha256", tokenizer_sha) != tokenizer_sha else "corpus"
        raise ConfigError(
            f"the {what} of this run changed since its checkpoint ({cfg.data.source!r}"
            + (f", tokenizer {data.tokenizer.path}" if what == "tokenizer" else "")
            + "); resuming would not continue the same run"
        )

    torch.manual_seed(cfg.train.seed)  # the same initial model on every process
    model = new_model(cfg, device, dtype)
    n_params = count_parameters(model)  # the LLaMA's own, before LoRA factors or quantization
    if init is not None:  # e.g. ReLoRA's full-rank warm start taken from an earlier run
        checkpoint.load_initial(model, init, cfg.train.init_from)
    if payload is not None:
        method.load_state_dict(payload.get("method", {}))
    model = method.prepare(model)
    wrapped = parallel.wrap(model, device)  # FSDP2 shards `model` itself, in place
    # saved by another number of FSDP2 processes, or by another mode: this process's share
    rank, world = (parallel.rank, parallel.world) if parallel.sharded else (0, 1)
    parts = payload.pop("parts", None) if payload is not None else None
    if payload is not None:
        parallel.load_model(model, reshard.model_state(model, parts, rank, world) if parts else payload["model"])
    optimizer = method.optimizer(model)
    if payload is not None:
        if parts:
            saved = [q["optimizer"] for q in parts]
            optimizer.load_state_dict(reshard.optimizer_state(optimizer, saved, rank, world))
            log(f"resumed from a checkpoint of {len(parts)} part(s), resharded for this launch{parallel.describe()}")
        else:
            optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])
        if device.type == "cuda" and payload.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(payload["cuda_rng"], device)

    if parallel.main:
        (out / "config.json").write_text(cfg.to_json())
        checkpoint.keep_tokenizer(out, data.tokenizer.path, tokenizer_sha)  # export never depends on a cache
    parallel.barrier()
    run = Run(
        cfg,
        out,
        parallel,
        device,
        dtype,
        data,
        Batches(data.train, cfg.seq_len, B, cfg.train.seed, cfg.data.shuffle),
        # about val_tokens tokens in global batches, whatever the micro-batch or process count
        val_batches(data.val, cfg.seq_len, B, cfg.train.val_tokens),
        method,
        model,
        wrapped,
        wrapped,
        optimizer,
        payload["step"] if payload is not None else 0,
        payload is not None,
        n_params,
        tokenizer_sha,
        rows,
        mb,
    )
    run.forward = _forward(run, log)
    _banner(run, log)
    return run


def _banner(run: Run, log) -> None:
    cfg, passes = run.cfg, run.batches.passes(run.cfg.train.steps)
    if run.resumed:
        log(f"resuming {run.out} from step {run.step} of {cfg.train.steps} (its checkpoint)")
    rank = run.method.describe()["rank"]  # an int, or a word for full rank
    rank = f", rank {rank}" if isinstance(rank, int) else ""
    log(
        f"petra: {cfg.preset} ({run.n_params / 1e6:.2f}M parameters, "
        f"{count_parameters(run.model, True) / 1e6:.2f}M trainable), method {run.method.name}{rank}, "
        f"{cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.seq_len} tokens "
        f"({cfg.train.steps * run.tokens_per_step / run.n_params:.3g} per parameter), {passes:.2f} passes over "
        f"{len(run.data.train) / 1e6:.2f}M training tokens, {run.device} {str(run.dtype).replace('torch.', '')}"
        + (f" ({quantized_parameters(run.model) / 1e6:.2f}M in int8)" if cfg.method.int8_weights != "off" else "")
        + run.parallel.describe()
    )
    if passes > 1:
        log(
            f"warning: {passes:.1f} passes over the training data; validation perplexity will measure "
            f"memorization as much as the method"
        )


class StepResult(NamedTuple):
    loss: float  # mean over all processes' rows
    grad_norm: float  # before clipping; not finite = the update was skipped
    lr: float
    stop: int  # the signal some process was sent (0: none)


def train_step(run: Run, signum: int | None) -> StepResult:
    """One optimizer step: learning rate, micro-batches, the method's update, one all-reduce."""
    method, parallel, device = run.method, run.parallel, run.device
    set_lr(run.optimizer, method.lr_factor(run.step))
    loss_sum = torch.zeros((), device=device)
    for j in range(run.accum):
        lo = parallel.rank * run.rows + j * run.micro_batch
        x, y = run.batches.get(run.step, slice(lo, lo + run.micro_batch))
        last = j == run.accum - 1
        method.before_backward(last)
        with parallel.grad_sync(run.wrapped, last):
            loss = run.forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    grad_norm = method.step(run.model, run.optimizer)
    # one all-reduce carries the loss, how many processes were told to stop and by which signal
    told = torch.tensor([float(signum is not None), float(signum or 0)], device=device)
    shared = parallel.all_reduce(torch.cat([(loss_sum.float() / run.accum).reshape(1), told]))
    stop = round(float(shared[2]) / float(shared[1])) if shared[1] > 0 else 0
    return StepResult(float(shared[0]) / parallel.world, float(grad_norm), run.optimizer.param_groups[0]["lr"], stop)


def _components(run: Run, log, show_progress: bool) -> tuple[Checkpointer, Validator, TrainLog, Health, Sampler]:
    cfg, t = run.cfg, run.cfg.train
    ckpt = Checkpointer(
        run.out, run.parallel, t.save_every, run.last_step, run.step if run.resumed else None, t.keep_checkpoints
    )
    val = Validator(run.val_batches, run.device, run.parallel, run.micro_batch, t.eval_every, t.steps)
    tlog = TrainLog(
        run.out / "metrics.jsonl",
        run.parallel.main,
        run.step if run.resumed else None,
        run.step,
        run.last_step,
        t.log_every,
        run.tokens_per_step,
        run.device,
        flops_per_token(cfg.model, cfg.seq_len),
        run.parallel.world,
        show_progress,
        log,
        trackers=Trackers(open_trackers(t.log_to, run.out, cfg.to_dict(), t.tracker_project))
        if run.parallel.main
        else None,
        total_steps=t.steps,
    )
    health = Health(cfg.model.vocab_size, t.max_skipped_steps, t.divergence_patience, log=tlog.print)
    every = t.sample_every if run.parallel.main and not run.parallel.sharded else 0  # sharded: no whole model
    if t.sample_every and not every and run.parallel.main:
        log("train.sample_every: FSDP2's parameters are shards; no samples are generated")
    sampler = Sampler(every, t.sample_prompt, run.data.tokenizer, run.data.val)
    return ckpt, val, tlog, health, sampler


def loop(run: Run, log=print, show_progress: bool = True) -> dict:
    """Steps until the schedule's end (or train.stop_after, or a signal); returns the summary."""
    ckpt, val, tlog, health, sampler = _components(run, log, show_progress)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    status, signum = "finished", None
    try:
        with StopRequest() as stop:
            while run.step < run.last_step:
                r = train_step(run, stop.signum)
                failure = health.check(run.step + 1, r.loss, r.grad_norm)
                if failure is None and not health.finite(r.loss, r.grad_norm):
                    if not run.parallel.all_finite(run.model, run.device):
                        failure = f"loss is {r.loss} at step {run.step} and the weights are no longer finite"
                if failure is not None:
                    disk = ckpt.on_disk()
                    raise TrainingError(
                        f"{failure}; stopping. {disk[0].upper()}{disk[1:]} (lower train.lr or raise train.grad_clip)"
                    )
                end = run.method.on_step_end(run.step, run.model, run.optimizer)
                run.model, run.optimizer = end.model, end.optimizer
                if end.params_changed:
                    run.rewrap(log)
                run.step += 1
                tlog.step(run.step, r.loss, r.lr, r.grad_norm, skipped=health.skipped_in_row > 0)
                if end.event:
                    tlog.event(run.step, end.event, end.fields)
                if val.due(run.step):
                    with tlog.paused():
                        vl, se = val.run(run.wrapped)
                    tlog.validation(run.step, vl, se)
                if sampler.due(run.step):
                    with tlog.paused():
                        tlog.sample(run.step, sampler.run(run.model))
                if ckpt.due(run.step) or r.stop:
                    why = health.abnormal()  # only a run in its normal range writes a checkpoint
                    if why is None:
                        with tlog.paused():
                            ckpt.save(run.step, run.model, run.device, run.state)
                    else:
                        tlog.print(f"step {run.step}: no checkpoint written: {why}; {ckpt.on_disk()}")
                if r.stop:
                    status, signum = "interrupted", r.stop  # every process exits with the same code
                    break
    finally:
        tlog.close()
    if status == "finished" and run.step < run.cfg.train.steps:
        status = "stopped"  # at train.stop_after
    why = health.abnormal()
    if status == "finished" and why is not None:  # collapsed or diverging before its patience ran out
        disk = ckpt.on_disk()
        raise TrainingError(f"the run ended at step {run.step} with {why}: it failed. {disk[0].upper()}{disk[1:]}")
    if status != "finished" and ckpt.saved_step is None:
        log(f"{status} at step {run.step}; no checkpoint was saved in {run.out}")
    elif status != "finished":
        saved = "checkpoint saved" if ckpt.saved_step == run.step else ckpt.on_disk()
        log(f"{status} at step {run.step} ({saved}); continue with: petra train --resume {run.out}")
    return _summary(run, status, val, health, tlog, signum)


def _summary(run: Run, status: str, val: Validator, health: Health, tlog: TrainLog, signum: int | None) -> dict:
    rate = tlog.rate()
    summary = {
        "status": status,
        "step": run.step,
        "val_loss": val.loss,
        "val_loss_se": val.se,
        "val_tokens": len(run.val_batches) * run.tokens_per_step,
        "val_ppl": perplexity(val.loss),
        "tokens": run.step * run.tokens_per_step,
        "tokens_per_param": round(run.step * run.tokens_per_step / run.n_params, 4),
        "params": run.n_params,
        "trainable_params": count_parameters(run.model, True),
        "tokens_per_s": rate["median"],
        "tokens_per_s_iqr": rate["iqr"],
        "throughput_windows": rate["n"],
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "skipped_steps": health.skipped,
        "peak_mem_gib": peak_memory_gib(run.device),
        "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
        "passes": run.batches.passes(run.step),
        **run.method.describe(),
    }
    if status == "interrupted":
        summary["signal"] = signum
    if run.parallel.active:
        summary.update(parallel=run.parallel.name, processes=run.parallel.world)
    if run.parallel.main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.parallel.barrier()
    return summary
