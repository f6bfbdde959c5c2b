"""Which projector refresh should be the default? Measured on real gradients (CPU is enough).

1. Train the mini preset with GaLore (exact SVD refresh). At every refresh, for each low-rank
   matrix, compare the share of the gradient's energy ||P^T G||^2 / ||G||^2 captured by
   the exact SVD basis, a randomized range finder, and one warm-started subspace iteration
   from the basis in use until then.
2. Train the same run with each projector and compare the validation loss.
Both with every projector refreshing on the same step (as galore-torch) and staggered
(method.stagger_refresh: each matrix at its own step of the gap, the energy then measured at
each matrix's own refresh):

    python benchmarks/projector_energy.py --steps 150 --out docs/projector_energy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from petra.config import build_config  # noqa: E402
from petra.optim.functional import sides  # noqa: E402
from petra.optim.projector import captured_energy, randomized_basis, subspace_basis, svd_basis  # noqa: E402
from petra.train import train  # noqa: E402


def galore_config(args, **overrides):
    """The mini GaLore run both studies train (rank, gap, batch, steps and lr from the flags)."""
    return build_config(
        overrides={
            "preset": "mini",
            "method.name": "galore",
            "method.rank": args.rank,
            "method.update_proj_gap": args.gap,
            "train.batch_size": args.batch,
            "train.steps": args.steps,
            "train.lr": args.lr,
            **overrides,
        }
    )


def energy_study(args, stagger: bool) -> dict:
    from petra.data import Batches, prepare
    from petra.methods import make_method
    from petra.model import LlamaForCausalLM

    cfg = galore_config(args, **{"method.stagger_refresh": stagger})
    data = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    batches = Batches(data.train, cfg.seq_len, cfg.train.batch_size, 0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg.model)
    method = make_method(cfg)
    opt = method.optimizer(model)
    ratios = {"randomized": [], "subspace": []}
    for step in range(args.steps):
        x, y = batches.get(step)
        model(x, y).backward()
        if step > 0:
            for group in opt.param_groups:
                if group.get("rank") is None:
                    continue
                for p in group["params"]:
                    st = opt.state[p]
                    if step % args.gap != st.get("offset", 0):  # not this matrix's refresh step
                        continue
                    left, _ = sides(p.shape, group["proj_type"])
                    g = p.grad if left else p.grad.t()
                    prev = st["P"] if left else st["Q"]
                    exact = captured_energy(g, svd_basis(g, prev.shape[1]))
                    ratios["randomized"].append(captured_energy(g, randomized_basis(g, prev.shape[1])) / exact)
                    ratios["subspace"].append(captured_energy(g, subspace_basis(g, prev)) / exact)
        method.step(model, opt)
    return {k: {"mean": statistics.mean(v), "min": min(v), "n": len(v)} for k, v in ratios.items()}


def loss_study(args, out_dir: Path) -> dict:
    res = {}
    for proj, stagger in (("svd", False), ("randomized", False), ("subspace", False), ("subspace", True)):
        name = proj + ("-staggered" if stagger else "")
        cfg = galore_config(
            args, **{"method.projector": proj, "method.stagger_refresh": stagger, "train.eval_every": args.steps}
        )
        t0 = time.time()
        s = train(cfg, out_dir / name, show_progress=False, log=lambda *a: None)
        res[name] = {"val_loss": s["val_loss"], "seconds": round(time.time() - t0, 1)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--gap", type=int, default=25)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--runs", default="/tmp/petra-projector-runs")
    ap.add_argument("--out", default="docs/projector_energy.json")
    a = ap.parse_args()
    import shutil

    shutil.rmtree(a.runs, ignore_errors=True)
    result = {
        "setup": vars(a),
        "energy_vs_svd": energy_study(a, stagger=False),
        "energy_vs_svd_staggered": energy_study(a, stagger=True),
        "val_loss": loss_study(a, Path(a.runs)),
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
