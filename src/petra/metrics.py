"""Metrics: JSONL log, throughput, peak memory, model FLOPs utilization."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from .config import ModelConfig

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
    xs = windows[max(1, len(windows) // 10):] if len(windows) > 2 else list(windows)
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
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._f = self.path.open("a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
