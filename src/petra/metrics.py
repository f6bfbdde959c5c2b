"""Metrics: the run's JSONL log and progress bar, throughput, peak memory, model FLOPs
utilization, optimizer state size."""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig
from .health import fmt_ppl, perplexity

# dense bf16 tensor-core peak, FLOP/s, by device name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention (PaLM appendix B)."""
    d, L = m.hidden_size, m.num_hidden_layers
    matmul_params = L * (4 * d * d + 3 * d * m.mlp_width) + d * m.vocab_size
    return 6 * matmul_params + 6 * L * d * seq_len  # 12 L d T, halved for the causal mask


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak RSS
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def steady_rate(windows: list[float]) -> dict:
    """Throughput over the steady part of a run: the median and interquartile range of the
    logging windows after warm-up (the first tenth of them, at least one, is dropped when
    enough remain). On a shared CPU single windows swing several-fold; the median does not."""
    xs = windows[max(1, len(windows) // 10) :] if len(windows) > 2 else list(windows)
    if not xs:
        return {"median": None, "iqr": None, "n": 0}
    s = sorted(xs)

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]

    return {"median": round(q(0.5), 1), "iqr": [round(q(0.25), 1), round(q(0.75), 1)], "n": len(s)}


class MetricsLog:
    """Appends one JSON object a line to run_dir/metrics.jsonl.

    On resume, lines past the resumed step are dropped first, so the file always tells one
    consistent history (the lines an interrupted run wrote after its last checkpoint go)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._f = self.path.open("a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill (the last one) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds (petra's optimizers keep FSDP2 state as
    plain local rows; torchao 8-bit moments count their codes and scales)."""
    total = 0
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k not in ("step", "moment_step"):
                inner = getattr(v, "codes", None)
                if inner is not None:
                    total += inner.numel() * inner.element_size() + v.scale.numel() * v.scale.element_size()
                else:
                    total += v.numel() * v.element_size()
    return total


class TrainLog:
    """What a run reports as it goes, each part at its own time: a metrics line every
    `log_every` steps (and at the last) with the window's throughput and MFU, every skipped
    step, each method event and validation; the progress bar; printed lines above the bar.
    Only the writing process (`write=True`) keeps metrics.jsonl. Time spent inside
    `paused()` (evaluation, saving) is not counted as training time."""

    def __init__(
        self,
        path: Path,
        write: bool,
        resume_step: int | None,
        step: int,
        last_step: int,
        log_every: int,
        tokens_per_step: int,
        device: torch.device,
        flops_per_token: float,
        world: int,
        show_progress: bool,
        log=print,
        trackers=None,
        total_steps: int = 0,
    ):
        self.metrics = MetricsLog(path, resume_step) if write else None
        self.trackers = trackers  # TensorBoard / wandb / trackio beside metrics.jsonl
        if self.metrics is not None and resume_step is None:
            self.metrics.path.write_text("")
        self.last_step, self.log_every, self.tokens_per_step = last_step, log_every, tokens_per_step
        self.device, self.log = device, log
        peak = peak_flops(device)
        self.mfu_per_token_s = flops_per_token / (peak * world) if peak else None  # MFU of 1 token/s
        self.show_progress = show_progress
        # the bar counts the schedule's steps: a run stopped early (--stop-after) shows where it stopped
        self.bar = tqdm(
            total=total_steps or last_step, initial=step, disable=not show_progress, unit="step", dynamic_ncols=True
        )
        self.windows: list[float] = []  # tokens/s of each logging window
        self._t, self._steps = time.perf_counter(), 0

    def print(self, line: str) -> None:
        """A line for the user; above the progress bar while it is up."""
        (tqdm.write if self.show_progress else self.log)(line)

    def write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        if self.trackers is not None:
            self.trackers.write(record)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, skipped: bool) -> None:
        self._steps += 1
        self.bar.update(1)
        record = {"step": step, "tokens": step * self.tokens_per_step}
        due = step % self.log_every == 0 or step == self.last_step
        if skipped:  # every skipped step is on record
            record["skipped"] = True
            if not due:
                self.write({**record, "loss": loss, "grad_norm": grad_norm})
        if not due:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t
        tps = self._steps * self.tokens_per_step / dt
        self.windows.append(tps)
        rec = {
            **record,
            "loss": round(loss, 5),
            "lr": lr,
            "grad_norm": round(grad_norm, 5),
            "tokens_per_s": round(tps, 1),
            "step_ms": round(1000 * dt / self._steps, 2),
            "peak_mem_gib": round(peak_memory_gib(self.device), 3),
        }
        if self.mfu_per_token_s:
            rec["mfu"] = round(tps * self.mfu_per_token_s, 4)
        self.write(rec)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        self._t, self._steps = time.perf_counter(), 0

    def event(self, step: int, event: str, fields: dict) -> None:
        self.write({"step": step, "tokens": step * self.tokens_per_step, "event": event, **fields})
        detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
        self.print(f"step {step}: {event}" + (f" ({detail})" if detail else ""))

    def validation(self, step: int, loss: float, se: float) -> None:
        ppl = perplexity(loss)
        self.write(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "val_loss": round(loss, 5),
                "val_loss_se": round(se, 5),
                "val_ppl": round(ppl, 3) if ppl is not None else None,
            }
        )
        self.print(f"step {step}: val loss {loss:.4f} ± {se:.4f}, ppl {fmt_ppl(loss)}")

    def sample(self, step: int, text: str) -> None:
        self.write({"step": step, "tokens": step * self.tokens_per_step, "sample": text})
        self.print(f"step {step}: sample: {text!r}")

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - t0

    def rate(self) -> dict:
        return steady_rate(self.windows)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.trackers is not None:
            self.trackers.close()
