"""Pre-train a small LlamaForCausalLM with transformers' Trainer and a petra optimizer.

    python examples/hf_trainer.py --optimizer apollo-mini --steps 40 --out runs/hf-trainer

The optimizer goes to Trainer through `optimizers=(optimizer, None)`: Trainer then builds its
own learning-rate schedule around it, saves its state in each checkpoint and restores it
with `resume_from_checkpoint`. `target_param_groups` picks the low-rank weights the way
transformers' `optim_target_modules` does. The data are token windows of petra's bundled
corpus (no download)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from petra.optim import APOLLO_MINI_GROUP, ApolloAdamW, FiraAdamW, GaLoreAdamW, target_param_groups

OPTIMIZERS = {  # name -> (class, low-rank group options, peak lr)
    "galore": (GaLoreAdamW, {"rank": 16, "update_proj_gap": 50, "scale": 0.25}, 1e-2),
    "apollo": (ApolloAdamW, {"rank": 16, "update_proj_gap": 50}, 1e-2),
    "apollo-mini": (ApolloAdamW, {"update_proj_gap": 50, **APOLLO_MINI_GROUP}, 1e-2),
    "fira": (FiraAdamW, {"rank": 16, "update_proj_gap": 50}, 1e-2),
}


class Windows(torch.utils.data.Dataset):
    """Fixed-length windows of a token array, as Trainer's causal-LM batches."""

    def __init__(self, tokens, seq_len: int):
        self.tokens, self.seq_len = torch.as_tensor(tokens.astype("int64")), seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        x = self.tokens[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": x, "labels": x}


def bible_windows(seq_len: int, cache_dir: str | None = None) -> tuple[Windows, int]:
    """Windows of the first 200k training tokens of the bundled corpus, and the vocabulary size."""
    from petra.config import build_config
    from petra.data import prepare

    overrides = {"preset": "tiny", **({"data.cache_dir": cache_dir} if cache_dir else {})}
    data = prepare(build_config(overrides=overrides).data, vocab_size=2048, log=lambda *a: None)
    return Windows(data.train[0:200_000], seq_len), data.vocab_size


def check_optimizer(out: Path, name: str, resume: bool) -> None:
    """Trainer restores whatever optimizer state it finds: a resume with another optimizer
    would load one optimizer's state into another's. The name is kept beside the checkpoints."""
    record = out / "petra-optimizer.json"
    if resume:
        saved = json.loads(record.read_text())["optimizer"] if record.is_file() else None
        if saved != name:
            raise SystemExit(
                f"error: --resume with --optimizer {name}, but {out} was trained with {saved or 'an unknown one'}; "
                f"resume with --optimizer {saved}"
                if saved
                else f"error: {out} holds no run of this example to resume"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"optimizer": name}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="apollo-mini")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/hf-trainer")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ap.add_argument("--cache-dir", default=None, help="petra's data cache (default: ~/.cache/petra)")
    a = ap.parse_args(argv)

    check_optimizer(Path(a.out), a.optimizer, a.resume)
    torch.manual_seed(0)
    train_set, vocab = bible_windows(64, a.cache_dir)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    cls, options, lr = OPTIMIZERS[a.optimizer]
    # as optim_target_modules=["attn", "mlp"] would choose: q/k/v/o and the MLP projections
    optimizer = cls(target_param_groups(model, ["attn", "mlp"], **options), lr=lr)
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=8,
        learning_rate=lr,  # Trainer's schedule sets the optimizer's lr from this
        warmup_steps=max(1, a.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, a.steps // 10),
        save_steps=max(1, a.steps // 2),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, optimizers=(optimizer, None))
    result = trainer.train(resume_from_checkpoint=a.resume or None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{a.optimizer}: {result.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(math.isfinite(x) for x in losses)
    return {"losses": losses, "log": trainer.state.log_history, "model": model}


if __name__ == "__main__":
    main()
