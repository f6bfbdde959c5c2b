"""`petra eval`: the perplexity of a model (a run directory or a Hugging Face Llama directory)
on any corpus petra can read, and a bridge to lm-evaluation-harness for task benchmarks.

The corpus is tokenized with the model's own tokenizer (once, into the token cache, as a
run's data is) and cut into windows of the model's context; the loss is the mean over every
window's tokens (all windows are full), with its standard error over windows, as petra's
validation reports it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from .config import ConfigError, DataConfig, validate_data
from .data import prepare, val_batches
from .generate import load
from .validation import evaluate


def perplexity_on(
    source: str,
    data: DataConfig,
    tokens: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    log=print,
) -> dict:
    """Loss, its standard error, perplexity and the tokens evaluated, of `source` on `data`."""
    if tokens < 1 or batch_size < 1 or seq_len < 0:
        raise ConfigError(
            f"--tokens {tokens} and --batch-size {batch_size} must be at least 1, --seq-len {seq_len} at least 0"
        )
    model, tok = load(source, device, dtype)
    context = model.config.max_position_embeddings
    seq = seq_len or context
    if seq > context:
        raise ConfigError(f"--seq-len {seq} is longer than the model's context ({context} tokens)")
    data.tokenizer = str(tok.path)
    validate_data(data)
    td = prepare(data, model.config.vocab_size, log=log, show_progress=False)
    batches, left = [], tokens
    for space in (td.train, td.val):  # every token of the corpus is held out from this model
        if left < seq or (len(space) - 1) // seq < 1:
            continue
        part = val_batches(space, seq, batch_size, left)
        batches += part
        left -= sum(x.numel() for x, _ in part)
    if not batches:
        raise ConfigError(f"data {data.source!r} holds fewer than {seq + 1} tokens: nothing to evaluate")
    loss, se = evaluate(model, batches, device)
    n = sum(x.numel() for x, _ in batches)
    return {"loss": loss, "se": se, "ppl": math.exp(loss) if loss < 30 else None, "tokens": n, "seq_len": seq}


def lm_eval(source: str, tasks: list[str], device: str, limit: int | None = None) -> dict:
    """lm-evaluation-harness's `simple_evaluate` on the model as a transformers checkpoint
    (a run directory is exported to a temporary directory first). Its tasks download their
    data sets from the Hugging Face hub, which it needs to reach."""
    try:
        import lm_eval as harness
    except ImportError:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    from . import checkpoint, hf

    path = Path(source).expanduser()
    with tempfile.TemporaryDirectory(prefix="petra-eval-") as tmp:
        if not hf.is_hf(path):
            path = checkpoint.export_hf(path, Path(tmp) / "hf", warn=lambda m: None)
        return harness.simple_evaluate(
            model="hf", model_args=f"pretrained={path},dtype=float32", tasks=tasks, device=device, limit=limit
        )
