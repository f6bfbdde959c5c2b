"""compare's runs, carried out: one at a time in this process, or up to `jobs` side by side
in child processes (one GPU shared, or one GPU each where several are visible).

A job trains (or resumes) one run directory up to a step. Every result comes from the run
directory itself (summary.json, metrics.jsonl), so a job done by a child, a job done here and
a job done by an earlier compare that was stopped read the same. Side-by-side runs slow each
other: each result says how many runs shared the machine with it (`side_by_side`), and
compare marks their throughput.

Signals: SIGINT and SIGTERM stop the whole compare. The running runs save a checkpoint and
stop (a child gets the signal passed on), no new run starts, and `run_jobs` raises
`CompareStopped` with the signal's number; the same command later resumes every run.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import checkpoint
from .config import ConfigError, RunConfig, from_dict, replace
from .metrics import read_metrics
from .parallel import main_process
from .signals import StopRequest


class CompareStopped(Exception):
    """compare was told to stop by signal `signum`; its runs saved their checkpoints."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@dataclass
class Job:
    key: str  # the run directory, relative to compare's --out
    cfg: RunConfig
    to_step: int  # train (or resume) up to this step
    label: str  # how the log names it: "galore lr 0.005", "full seed 1"
    side_by_side: int = 1  # the most runs that trained at once with it (itself included)
    tags: dict = field(default_factory=dict)  # the scheduler's own bookkeeping


def read_summary(run_dir: Path) -> dict | None:
    p = run_dir / "summary.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None  # a summary cut short by a kill: the run is resumed from its checkpoint


def val_loss_at(run_dir: Path, step: int) -> float | None:
    """The run's validation loss at `step`, from its metrics.jsonl."""
    hits = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step") == step and "val_loss" in r]
    return hits[-1] if hits else None


def reached(run_dir: Path, step: int) -> dict | None:
    """The run's summary if it already stands at `step` or beyond (nothing to train)."""
    s = read_summary(run_dir)
    if s is not None and s.get("status") in ("finished", "stopped") and s.get("step", 0) >= step:
        return s
    return None


def advance(job: Job, out: Path, show_progress: bool, log, note: str = "") -> dict:
    """Train job's run from scratch, or resume it, up to job.to_step; its summary, with
    `loss_at` the validation loss at that step. A run that fails (out of memory, divergence)
    gets a summary marked failed; bad input (ConfigError) is raised, for every method alike."""
    from .train import train

    run_dir, cfg = out / job.key, job.cfg
    done = reached(run_dir, job.to_step)
    if done is not None:
        log(f"{job.label}: {run_dir} reached step {job.to_step} earlier, not rerun")
    else:
        resume = checkpoint.exists(run_dir)
        stop = job.to_step if job.to_step < cfg.train.steps else 0
        want = replace(cfg, train={"stop_after": stop})
        log(f"-- {job.label}: {'resuming' if resume else 'training'} to step {job.to_step} in {run_dir}{note}")
        try:
            done = train(
                want,
                run_dir,
                resume=resume,
                explicit={("train", "stop_after")},
                show_progress=show_progress,
                log=log,
            )
        except ConfigError:
            raise
        except Exception as e:  # out of memory, divergence, ...: a failed run, the others go on
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"{job.label} failed: {reason}")
            done = {"status": "failed", "reason": reason}
            if main_process():
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "summary.json").write_text(json.dumps(done))
        finally:
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    loss = val_loss_at(run_dir, job.to_step) if done.get("status") in ("finished", "stopped") else None
    return {**done, "loss_at": loss}


def _child(key: str, cfg: dict, to_step: int, label: str, out: str, log_path: str, gpu: int | None) -> None:
    """A side-by-side run's process: its output goes to its log file."""
    if gpu is not None:  # before CUDA starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    f = open(log_path, "a", buffering=1)
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f
    try:
        advance(Job(key, from_dict(cfg), to_step, label), Path(out), False, print)
    except ConfigError as e:
        print(f"petra: error: {e}")
        sys.exit(2)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _finish(job: Job, out: Path, result: dict, started: float, log) -> dict:
    """Record how many runs shared the machine with it, and say how it went."""
    run_dir = out / job.key
    result = {**result, "side_by_side": job.side_by_side}
    s = read_summary(run_dir)
    if s is not None and main_process():
        s["side_by_side"] = max(job.side_by_side, s.get("side_by_side", 1))
        (run_dir / "summary.json").write_text(json.dumps(s, indent=2))
    status = result.get("status")
    if status in ("finished", "stopped") and result.get("loss_at") is not None:
        speed = f", {result['tokens_per_s']:,.0f} tokens/s" if result.get("tokens_per_s") else ""
        log(
            f"   {job.label}: val loss {result['loss_at']:.4f} at step {job.to_step} "
            f"({time.perf_counter() - started:.0f} s{speed})"
        )
    elif status == "failed":
        log(f"   {job.label}: failed ({result.get('reason', '')})")
    return result


def run_jobs(
    queue: list[Job],
    on_done: Callable[[Job, dict], list[Job]],
    out: Path,
    jobs: int = 1,
    show_progress: bool = True,
    log=print,
    progress: Callable[[], str] = lambda: "",
) -> None:
    """Carry out the queue, up to `jobs` at once; `on_done(job, result)` returns the jobs
    that result makes possible. Raises CompareStopped when told to stop by a signal."""
    queue = list(queue)
    with StopRequest() as stop:
        if jobs <= 1:
            while queue and not stop.requested:
                job = queue.pop(0)
                t0 = time.perf_counter()
                r = _finish(job, out, advance(job, out, show_progress, log, progress()), t0, log)
                if r.get("status") == "interrupted":  # the run caught the signal and saved
                    raise CompareStopped(r.get("signal") or 2)
                queue += on_done(job, r)
            if stop.requested:
                raise CompareStopped(stop.signum)
            return
        _side_by_side(queue, on_done, out, jobs, log, progress, stop)


def _side_by_side(queue, on_done, out: Path, jobs: int, log, progress, stop: StopRequest) -> None:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state is inherited
    gpus = _gpus()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict = {}  # sentinel -> (process, job, start time, slot)
    forwarded = None
    while queue or running:
        if stop.requested and forwarded != stop.signum:  # pass it on; the children save and stop
            for p, *_ in running.values():
                if p.is_alive():
                    os.kill(p.pid, stop.signum)
            forwarded = stop.signum
        while queue and len(running) < jobs and not stop.requested:
            job = queue.pop(0)
            done = reached(out / job.key, job.to_step)
            if done is not None:  # nothing to train: no process to start
                log(f"{job.label}: {out / job.key} reached step {job.to_step} earlier, not rerun")
                queue += on_done(
                    job,
                    _finish(
                        job,
                        out,
                        {**done, "loss_at": val_loss_at(out / job.key, job.to_step)},
                        time.perf_counter(),
                        lambda *a: None,
                    ),
                )
                continue
            slot = min(set(range(jobs)) - {v[3] for v in running.values()})
            log_path = logs / (job.key.replace("/", "_") + ".log")
            p = ctx.Process(
                target=_child,
                args=(
                    job.key,
                    job.cfg.to_dict(),
                    job.to_step,
                    job.label,
                    str(out),
                    str(log_path),
                    slot % gpus if gpus > 1 else None,
                ),
            )
            p.start()
            running[p.sentinel] = (p, job, time.perf_counter(), slot)
            for _, j, _, _ in running.values():
                j.side_by_side = max(j.side_by_side, len(running))
            log(f"-- {job.label}: to step {job.to_step} [{len(running)} running; log {log_path}]{progress()}")
        if not running:
            break
        for sentinel in multiprocessing.connection.wait(list(running), timeout=1.0):
            p, job, t0, _ = running.pop(sentinel)
            p.join()
            if p.exitcode == 2:  # bad input is the user's to fix: the other runs save and stop first
                last = [ln for ln in (logs / (job.key.replace("/", "_") + ".log")).read_text().splitlines() if ln]
                for q, *_ in running.values():
                    os.kill(q.pid, signal.SIGTERM)
                    q.join()
                raise ConfigError(f"{job.label}: {last[-1] if last else 'bad input'}")
            r = read_summary(out / job.key) or {"status": "failed", "reason": f"exit code {p.exitcode}"}
            if p.exitcode not in (0, None) and r.get("status") not in ("failed", "interrupted"):
                r = {"status": "failed", "reason": f"the run's process ended with exit code {p.exitcode}"}
            if r.get("status") in ("finished", "stopped"):
                r["loss_at"] = val_loss_at(out / job.key, job.to_step)
            r = _finish(job, out, r, t0, log)
            if not stop.requested and r.get("status") != "interrupted":
                queue += on_done(job, r)
            elif r.get("status") == "interrupted" and not stop.requested:
                stop.signum = r.get("signal") or 15  # a child was signalled alone: stop them all
    if stop.requested:
        raise CompareStopped(stop.signum)
