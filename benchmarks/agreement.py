"""Quality of petra's choices where it once differed from the reference implementations
(issue "agreement with the references"): each variant trained with several seeds on the
same data, final validation loss per seed, mean and spread. Runs on CPU (mini) or a GPU (60m).

    python benchmarks/agreement.py --preset mini --steps 200 --batch-size 16 --seeds 0,1,2 \
        --variants squares-right,squares-left --out docs/agreement/mini_squares.json
    python benchmarks/agreement.py --preset 60m --steps 300 --batch-size 32 --seeds 0,1 \
        --variants squares-right,squares-left,galore8bit,galore8bit-unguarded,relora-joint,relora-independent

Variants (the first of each pair is petra's behaviour now):
  squares-right / squares-left: GaLore (AdamW) projecting square matrices from the right
      (galore-torch) or from the left (petra before);
  galore / galore8bit / galore8bit-unguarded: fp32 state, 8-bit state, 8-bit without the
      guards (a positive second moment may round to 0, no step bound; petra before);
  relora-joint / relora-independent: ReLoRA pruning both moments with one mask, or each on
      its own (the reference; petra before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import petra.optim.adam8bit as adam8bit
import petra.optim.galore as galore
from petra.config import build_config
from petra.train import train


@contextlib.contextmanager
def variant(name: str):
    """(overrides, patches) of a variant; the patches restore petra's earlier behaviour."""
    undo = []
    if name == "squares-left":
        old = galore.sides
        galore.sides = lambda shape, t: (shape[0] <= shape[1], shape[0] > shape[1]) if t == "std" else old(shape, t)
        undo.append(lambda: setattr(galore, "sides", old))
    if name == "galore8bit-unguarded":
        req, bound = adam8bit._requantize, adam8bit.adam_step_bound
        adam8bit._requantize = lambda x, c, s, q, positive: req(x, c, s, q, False)
        adam8bit.adam_step_bound = lambda *a: 1e30
        undo += [lambda: setattr(adam8bit, "_requantize", req), lambda: setattr(adam8bit, "adam_step_bound", bound)]
    method = {
        "squares-right": "galore",
        "squares-left": "galore",
        "galore": "galore",
        "galore8bit": "galore8bit",
        "galore8bit-unguarded": "galore8bit",
        "relora-joint": "relora",
        "relora-independent": "relora",
    }[name]
    ov = {"method.name": method}
    if method == "relora":
        ov["method.prune_mask"] = "independent" if name.endswith("independent") else "joint"
    try:
        yield ov
    finally:
        for u in undo:
            u()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="squares-right,squares-left")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {}
    for name in a.variants.split(","):
        losses = []
        for seed in seeds:
            with variant(name) as ov, tempfile.TemporaryDirectory() as tmp:
                steps = a.steps
                extra = (
                    {
                        "method.warm_start_steps": steps // 4,
                        "method.reset_interval": max(4, steps // 4),
                        "method.restart_warmup_steps": 10,
                    }
                    if ov["method.name"] == "relora"
                    else {}
                )
                overrides = {
                    "preset": a.preset,
                    "train.steps": steps,
                    "train.batch_size": a.batch_size,
                    "train.lr": a.lr,
                    "train.seed": seed,
                    "train.eval_every": steps,
                    "train.log_every": 50,
                    "train.save_every": 0,
                    **ov,
                    **extra,
                    **dict(kv.split("=", 1) for kv in a.set),
                }
                t0 = time.time()
                s = train(build_config(overrides=overrides), Path(tmp) / "r", show_progress=False, log=lambda *x: None)
                losses.append(s["val_loss"])
                print(f"{name} seed {seed}: val loss {s['val_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        results[name] = {
            "val_loss": losses,
            "mean": statistics.mean(losses),
            "stdev": statistics.stdev(losses) if len(losses) > 1 else None,
        }
    print(f"\n{a.preset}, {a.steps} steps of batch {a.batch_size}, lr {a.lr}, seeds {seeds}")
    for name, r in results.items():
        sd = f" +- {r['stdev']:.4f}" if r["stdev"] is not None else ""
        print(f"  {name:22s} {r['mean']:.4f}{sd}   per seed {[round(x, 4) for x in r['val_loss']]}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
