"""Two CPU processes (torchrun, gloo) against one: DDP and FSDP2, for every method.

The 2-process runs split each global batch of 4 sequences into 2 x 2; the 1-process
reference takes all 4. Losses must agree to float tolerance, and a 2-process run stopped
in the middle of a projector period / ReLoRA cycle must resume exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petra import checkpoint
from petra.metrics import read_metrics
from petra.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
METHODS = {
    "full": {"method.name": "full"},
    "full-accum": {"method.name": "full", "train.micro_batch_size": 1},
    "full-unit2": {"method.name": "full", "train.fsdp_unit_layers": 2},  # FSDP2: both layers one unit
    "galore": {"method.name": "galore", "method.rank": 8, "method.update_proj_gap": 5},
    "galore-layerwise": {
        "method.name": "galore",
        "method.rank": 8,
        "method.update_proj_gap": 5,
        "method.layerwise": True,
    },
    "relora": {
        "method.name": "relora",
        "method.rank": 8,
        "method.reset_interval": 4,
        "method.warm_start_steps": 3,
        "method.restart_warmup_steps": 2,
        "method.prune": "random",
    },
    "muon": {"method.name": "muon"},  # under FSDP2 each matrix is orthogonalized on its owner rank
    # channel scales of row shards: left projections (64 x 176) gather column scales, right ones are local
    "apollo": {"method.name": "apollo", "method.rank": 8, "method.update_proj_gap": 5},
    "apollo-mini": {"method.name": "apollo-mini", "method.update_proj_gap": 5},  # one scale: summed norms
    "fira": {"method.name": "fira", "method.rank": 8, "method.update_proj_gap": 5},
    "fira8bit": {"method.name": "fira8bit", "method.rank": 8, "method.update_proj_gap": 5},
    "adam-mini": {"method.name": "adam-mini"},  # a head's and a norm's squares summed over the ranks
    # factored second moments: row and column means, and the RMS, summed over the ranks
    "galore-adafactor": {"method.name": "galore-adafactor", "method.rank": 8, "method.update_proj_gap": 5},
    # layer-wise: updates inside backward under FSDP2, after it under DDP; APOLLO and Fira without
    # clipping (their update scales the full gradient, which clipping layer-wise does not keep)
    "apollo-mini-layerwise": {
        "method.name": "apollo-mini",
        "method.update_proj_gap": 5,
        "method.layerwise": True,
        "train.grad_clip": 0.0,
    },
    "fira-layerwise": {
        "method.name": "fira",
        "method.rank": 8,
        "method.update_proj_gap": 5,
        "method.layerwise": True,
        "train.grad_clip": 0.0,
    },
    "apollo-layerwise": {
        "method.name": "apollo",
        "method.rank": 8,
        "method.update_proj_gap": 5,
        "method.layerwise": True,
        "train.grad_clip": 0.0,
    },
    "galore8bit-layerwise": {
        "method.name": "galore8bit",
        "method.rank": 8,
        "method.update_proj_gap": 5,
        "method.layerwise": True,
    },
    "galore-adafactor-layerwise": {
        "method.name": "galore-adafactor",
        "method.rank": 8,
        "method.update_proj_gap": 5,
        "method.layerwise": True,
    },
}
FOUR = ("galore", "apollo-mini", "muon", "adam-mini", "galore-adafactor")  # also at 4 processes under FSDP2
# checkpoints that reshard: stopped at step 7 by 1 process and resumed by 2 under FSDP2; stopped by 2
# FSDP2 processes and resumed by 4, and by 1
RESHARDED = ("galore", "muon", "adam-mini", "galore-adafactor", "fira8bit", "relora")
RESUMED = ("galore", "relora", "muon", "fira")


def _losses(run):
    return [r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if "loss" in r]


def _torchrun(spec: Path, nproc: int = 2) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(WORKER),
        str(spec),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = r.stderr
    at = err.find("Traceback")
    assert r.returncode == 0, r.stdout[-2000:] + (err[at : at + 6000] if at >= 0 else err[-4000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("dist")
    base = tiny_overrides
    from petra.config import build_config

    quiet = dict(show_progress=False, log=lambda *a: None)
    for name, ov in METHODS.items():  # the 1-process references (this also fills the token cache)
        if name not in ("full-accum", "full-unit2"):
            train(build_config(overrides={**base, **ov}), root / "one" / name, **quiet)
    for name in RESHARDED:
        train(build_config(overrides={**base, **METHODS[name], "train.stop_after": 7}), root / "from1" / name, **quiet)
    for mode in ("ddp", "fsdp"):
        jobs = []
        for name, ov in METHODS.items():
            jobs.append({"out": str(root / mode / name), "overrides": {**base, **ov, "train.parallel": mode}})
        for name in RESUMED:
            ov = {**base, **METHODS[name], "train.parallel": mode, "train.stop_after": 7}
            jobs += [
                {"out": str(root / mode / f"{name}-resumed"), "overrides": ov},
                {"out": str(root / mode / f"{name}-resumed"), "resume": True},
            ]
        if mode == "fsdp":
            for name in RESHARDED:
                ov = {**base, **METHODS[name], "train.parallel": "fsdp"}
                jobs.append(
                    {"out": str(root / "from1" / name), "resume": True, "overrides": ov, "change": ["train.parallel"]}
                )
                jobs += [
                    {"out": str(root / f"from2-{to}" / name), "overrides": {**ov, "train.stop_after": 7}}
                    for to in (1, 4)
                ]
        spec = root / f"{mode}.json"
        spec.write_text(json.dumps(jobs))
        _torchrun(spec)
    fsdp = {**base, "train.parallel": "fsdp"}
    jobs = [{"out": str(root / "fsdp4" / n), "overrides": {**fsdp, **METHODS[n]}} for n in FOUR]
    jobs += [{"out": str(root / "from2-4" / n), "resume": True} for n in RESHARDED]
    (root / "fsdp4.json").write_text(json.dumps(jobs))
    _torchrun(root / "fsdp4.json", nproc=4)
    for name in RESHARDED:  # an FSDP2 checkpoint resumed by one process
        cfg = build_config(overrides={**base, **METHODS[name], "train.parallel": "none"})
        train(cfg, root / "from2-1" / name, resume=True, explicit={("train", "parallel")}, **quiet)
    return root


@pytest.mark.parametrize("name", RESHARDED)
@pytest.mark.parametrize("route", ["from1", "from2-4", "from2-1"])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, name, route):
    """Stopped at step 7 by one process and resumed by two FSDP2 processes (from1), or stopped by
    two and resumed by four (from2-4) or by one (from2-1): the run goes on as one process's does."""
    one, resumed = _losses(runs / "one" / name), _losses(runs / route / name)
    assert len(resumed) == 12 and resumed == pytest.approx(one, rel=2e-4, abs=2e-4)
    s1 = json.loads((runs / "one" / name / "summary.json").read_text())
    s2 = json.loads((runs / route / name / "summary.json").read_text())
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=2e-4)
    assert s2.get("processes", 1) == {"from1": 2, "from2-4": 4, "from2-1": 1}[route]
    # the newest checkpoint alone is on disk, in the format of the processes that wrote it last
    run = runs / route / name
    whole, sharded = (run / checkpoint.CKPT).is_file(), (run / checkpoint.SHARDED).is_dir()
    assert (whole, sharded) == ((True, False) if route == "from2-1" else (False, True))


@pytest.mark.parametrize("name", FOUR)
def test_four_fsdp2_processes_match_one(runs, name):
    """One row of each global batch of 4 per process."""
    one, four = _losses(runs / "one" / name), _losses(runs / "fsdp4" / name)
    assert len(one) == len(four) == 12
    assert four == pytest.approx(one, rel=2e-4, abs=2e-4)
    s4 = json.loads((runs / "fsdp4" / name / "summary.json").read_text())
    assert s4["processes"] == 4 and s4["parallel"] == "fsdp"


@pytest.mark.parametrize("mode, name", [(m, n) for m in ("ddp", "fsdp") for n in METHODS])
def test_two_processes_match_one(runs, mode, name):
    ref = "full" if name.startswith("full-") else name
    one, two = _losses(runs / "one" / ref), _losses(runs / mode / name)
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=2e-4, abs=2e-4)
    s1 = json.loads((runs / "one" / ref / "summary.json").read_text())
    s2 = json.loads((runs / mode / name / "summary.json").read_text())
    assert s2["processes"] == 2 and s2["parallel"] == mode
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=2e-4)
    # DDP replicates the optimizer state; under FSDP2 each process holds about half of it
    # (GaLore's projectors, a third of its low-rank state, are held whole by every process)
    if mode == "ddp":
        assert s2["optimizer_state_bytes"] == s1["optimizer_state_bytes"]
    else:  # Adafactor's factored moments are small: most of its state is the projectors
        share = 0.8 if name.startswith("galore-adafactor") else 0.7
        assert s2["optimizer_state_bytes"] < share * s1["optimizer_state_bytes"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", RESUMED)
def test_two_process_resume_is_exact(runs, mode, name):
    assert _losses(runs / mode / f"{name}-resumed") == _losses(runs / mode / name)


def test_fsdp_checkpoint_is_sharded_and_consolidates(runs):
    run = runs / "fsdp" / "relora"
    assert not (run / checkpoint.CKPT).exists()
    shards = sorted((run / checkpoint.SHARDED).glob("rank*.pt"))
    assert [p.name for p in shards] == ["rank00000.pt", "rank00001.pt"]
    # each process holds half of the rows of every matrix
    parts = [torch.load(p, weights_only=False) for p in shards]
    name = "model.layers.0.mlp.gate_proj.lora_B"
    assert parts[0]["model"][name].shape[0] + parts[1]["model"][name].shape[0] == 176
    whole = checkpoint.load_consolidated(run)["model"]
    ref = checkpoint.load(runs / "one" / "relora")["model"]
    assert whole.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(whole[k], ref[k], rtol=1e-3, atol=1e-4)
    assert len(checkpoint.load(run)["parts"]) == 2  # one process resumes it from both (reshard)


def test_ddp_checkpoint_resumes_on_one_process(runs, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(runs / "ddp" / "galore-resumed", run)
    payload = checkpoint.load(run)
    assert payload["step"] == 12 and payload["config"]["train"]["parallel"] == "ddp"


def test_a_save_killed_between_its_renames_leaves_the_old_shards(runs, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(runs / "fsdp" / "galore", run)
    (run / checkpoint.SHARDED).rename(run / (checkpoint.SHARDED + ".old"))  # as if killed mid-save
    assert checkpoint.exists(run)
    assert checkpoint.load(run, rank=1, world=2, sharded=True)["step"] == 12
    parts = checkpoint.load(run, rank=0, world=4, sharded=True)["parts"]  # for 4 processes: both to reshard
    assert [p["step"] for p in parts] == [12, 12]


def test_parallel_modes_need_torchrun(tiny_cfg, tmp_path, monkeypatch):
    from petra.config import ConfigError

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="needs a launch by torchrun"):
        train(tiny_cfg(**{"train.parallel": "fsdp"}), tmp_path / "r", show_progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="train.parallel='zero'"):
        tiny_cfg(**{"train.parallel": "zero"})


def test_a_signal_to_one_rank_stops_every_rank_with_its_code(tmp_path, cache_dir):
    """SIGTERM to rank 1 alone: the signal travels in the step's all-reduce, so rank 0 stops at
    the same step, saves, and reports the same signal (no rank crashes)."""
    import signal
    import time

    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "petra"]
    cmd += ["train", "--preset", "tiny", "--steps", "100000", "--batch-size", "4", "--seq-len", "32"]
    cmd += ["--out", str(run), "--no-progress", "--log-every", "1", "--eval-every", "100000", "--save-every", "0"]
    cmd += ["--set", f"data.cache_dir={cache_dir}", "--set", "train.parallel=ddp"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    ranks = sorted(int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())  # written by rank 0, which was not signalled
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM, out[-3000:]
    # torchrun reports the ranks ended by the signal (in a traceback of its own); no rank crashed
    assert "exitcode  : 143" in out and "TypeError" not in out and checkpoint.exists(run)


SHARDED_OPTIMIZERS = ["muon", "apollo", "apollo-mini", "fira", "galore8bit", "adam-mini", "galore-adafactor"]


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("name", SHARDED_OPTIMIZERS)
def test_sharded_optimizers_equal_one_process(tmp_path, nproc, name):
    """Matrices of 7 shapes (tall, wide, square, fewer rows than processes: both projection
    sides; three shapes twice, which update as stacks of shards), 6 steps with
    a refresh and a step the norm-growth limiter holds back, on row shards at 2 and 4
    processes: the parameters of one process, and each process holds a share of the state.
    Muon (owner-rank Newton-Schulz) equals torch.optim.Muon exactly."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sharded_worker as w

    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run(
        [*cmd, str(Path(w.__file__)), name, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[:2000] + " ... " + r.stderr[-2000:]
    got = torch.load(out, weights_only=False)
    if name in ("apollo", "apollo-mini", "fira"):  # each pair's shards stacked after the first step
        assert got["stacked"] == [2] * 3 * 5, got["stacked"]  # (8-bit: its moments here are too small)
    whole, grads = w.data()
    ref = [torch.nn.Parameter(x) for x in whole]
    opt = (
        torch.optim.Muon(ref, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        if name == "muon"
        else w.make(name, ref)
    )
    for step in grads:
        for p, g in zip(ref, step):
            p.grad = g
        opt.step()
    start, _ = w.data()
    for a, b, w0 in zip(got["params"], ref, start):
        if name == "muon":
            assert torch.equal(a, b.detach())
        else:  # sums over the ranks in another order: float32 rounding of the bases, which Adam's
            # normalization amplifies on small coordinates; bounded against what the steps moved
            moved = (b.detach() - w0).abs().max()
            assert (a - b.detach()).abs().max() <= 1e-3 * moved, (name, (a - b.detach()).abs().max(), moved)
    from petra.metrics import optimizer_state_bytes

    assert got["state_bytes"] < 0.75 * optimizer_state_bytes(opt)  # the most any one process held
    # the processes' states, put together as a checkpoint that reshards does, are one process's
    from petra.reshard import optimizer_state

    saved = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(nproc)]
    whole = optimizer_state(opt, saved, 0, 1)
    ref_state = opt.state_dict()
    ref_state = ref_state["state"] if "chain" not in ref_state else None
    assert ref_state is not None and whole["state"].keys() == ref_state.keys()
    for i, st in ref_state.items():
        for k, v in st.items():
            mine = whole["state"][i][k]
            mine = mine.dequantize() if hasattr(mine, "codes") else mine
            v = v.dequantize() if hasattr(v, "codes") else v
            if torch.is_tensor(v) and v.is_floating_point() and k not in ("P", "Q"):  # bases: whole, rank 0's
                assert mine.shape == v.shape, (name, i, k)
                assert (mine - v).abs().max() <= 1e-3 * v.abs().max() + 1e-6, (name, i, k)
    # and a process of 3 takes its share of every cut tensor
    part = optimizer_state(opt, saved, 1, 3)
    assert all(part["state"][i].keys() == whole["state"][i].keys() for i in whole["state"])


@pytest.mark.parametrize("name", ["full", "galore", "apollo", "apollo-mini", "fira", "muon", "relora", "adam-mini"])
def test_the_per_process_state_estimate_matches_what_each_process_held(runs, name):
    """petra estimate --gpus and plan --gpus: the optimizer state (with projectors) one FSDP2
    process holds, from the memory model, against what the 2-process CPU runs measured."""
    from petra.config import from_dict
    from petra.memory import GIB, breakdown_gib

    run = runs / "fsdp" / name
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    est = breakdown_gib(cfg, weight_bytes=4, gpus=2, mode="fsdp")  # fp32 on a CPU
    measured = json.loads((run / "summary.json").read_text())["optimizer_state_bytes"]
    assert measured == pytest.approx((est["optimizer_state"] + est["projectors"]) * GIB, rel=0.01)
