import json

import pytest
import torch

from petra import checkpoint
from petra.config import ConfigError
from petra.metrics import read_metrics
from petra.train import TrainingError, train

quiet = dict(show_progress=False, log=lambda *a: None)


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("full", {}),
        ("galore", {"method.rank": 8, "method.update_proj_gap": 5, "method.projector": "randomized"}),
        (
            "relora",
            {
                "method.rank": 8,
                "method.reset_interval": 4,
                "method.warm_start_steps": 3,
                "method.restart_warmup_steps": 2,
            },
        ),
        ("apollo-mini", {"method.update_proj_gap": 5}),  # the random projection redrawn after the stop
        ("fira", {"method.rank": 8, "method.update_proj_gap": 5}),
        ("muon", {}),  # two optimizers in one state dict
        # layer-wise updates read the learning rate from the groups a resume loads
        ("galore", {"method.rank": 8, "method.update_proj_gap": 5, "method.layerwise": True}),
        ("apollo", {"method.layerwise": True, "train.grad_clip": 0.0}),
        ("adam-mini", {}),
    ],
)
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_cfg, method, extra):
    ov = {"method.name": method, **extra}
    full = train(tiny_cfg(**ov), tmp_path / "a", **quiet)
    # interrupted in the middle of a projector period / ReLoRA cycle, then resumed
    train(tiny_cfg(**ov, **{"train.stop_after": 7}), tmp_path / "b", **quiet)
    assert checkpoint.load(tmp_path / "b")["step"] == 7
    resumed = train(None, tmp_path / "b", resume=True, **quiet)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert resumed["val_loss"] == full["val_loss"]
    a, b = checkpoint.load(tmp_path / "a")["model"], checkpoint.load(tmp_path / "b")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_validation_loss(tmp_path, tiny_cfg):
    s = train(tiny_cfg(**{"train.steps": 30, "train.lr": 3e-3, "train.eval_every": 10}), tmp_path / "r", **quiet)
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3
    assert s["status"] == "finished" and json.loads((tmp_path / "r" / "config.json").read_text())["preset"] == "tiny"


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_cfg):
    train(tiny_cfg(), tmp_path / "a", **quiet)
    train(tiny_cfg(**{"train.micro_batch_size": 2}), tmp_path / "b", **quiet)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-4)


def _patch_loss(monkeypatch, loss):
    """Models built from now on compute their loss with `loss` (the default kernel set's)."""
    import dataclasses

    import petra.model as pm

    monkeypatch.setattr(pm, "TORCH", dataclasses.replace(pm.TORCH, cross_entropy=loss))


def _poison_forward(monkeypatch, bad):
    """The training forwards whose number (1-based) is in `bad` return a NaN loss."""
    from petra.kernels import fused_cross_entropy as real

    calls = {"n": 0}

    def poisoned(h, w, t, chunk=4096):
        if torch.is_grad_enabled():  # training forwards only, not evaluation
            calls["n"] += 1
        loss = real(h, w, t, chunk)
        return loss * float("nan") if calls["n"] in bad and torch.is_grad_enabled() else loss

    _patch_loss(monkeypatch, poisoned)


@pytest.mark.parametrize("method", ["full", "galore", "galore-layerwise", "apollo"])
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, tiny_cfg, monkeypatch, method):
    _poison_forward(monkeypatch, {8})
    name, layerwise = method.removesuffix("-layerwise"), method.endswith("-layerwise")
    ov = {"method.name": name, "method.layerwise": layerwise, "method.rank": 8, "train.save_every": 3}
    s = train(tiny_cfg(**ov), tmp_path / "r", **quiet)
    assert s["status"] == "finished" and s["skipped_steps"] == 1
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("skipped")] == [8]
    # the skipped update changed nothing: a run stopped at step 7 has the weights of step 8
    monkeypatch.undo()
    train(tiny_cfg(**ov, **{"train.stop_after": 7}), tmp_path / "ref", **quiet)
    a = checkpoint.load(tmp_path / "ref")["model"]
    _poison_forward(monkeypatch, {8})
    train(tiny_cfg(**ov, **{"train.stop_after": 8}), tmp_path / "b", **quiet)
    b = checkpoint.load(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    _poison_forward(monkeypatch, set(range(8, 100)))
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"3 steps in a row .* last good checkpoint in .* \(step 9\) is intact"):
        train(tiny_cfg(**{"train.save_every": 3, "train.eval_every": 100, "train.max_skipped_steps": 2}), run, **quiet)
    payload = checkpoint.load(run)  # step 9: three skipped steps changed no weight, so it is good
    assert payload["step"] == 9
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


def test_weights_made_non_finite_by_an_update_are_never_saved(tmp_path, tiny_cfg, monkeypatch):
    from petra.optim import LocalAdamW

    real, calls = LocalAdamW.step, {"n": 0}

    def step(self, closure=None, found_inf=None):  # the 4th update leaves a NaN in the weights
        out = real(self, closure, found_inf)
        calls["n"] += 1
        if calls["n"] == 4:
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return out

    monkeypatch.setattr(LocalAdamW, "step", step)
    run = tmp_path / "r"
    with pytest.raises(
        TrainingError,
        match=r"not finite after step 4; nothing was saved and the last good "
        r"checkpoint in .* \(step 2\) is intact",
    ):
        train(tiny_cfg(**{"train.save_every": 2}), run, **quiet)
    assert checkpoint.load(run)["step"] == 2
    calls["n"] = 0
    with pytest.raises(TrainingError, match="nothing was saved and no checkpoint was saved in"):
        train(tiny_cfg(**{"train.save_every": 4}), tmp_path / "r2", **quiet)
    assert not checkpoint.exists(tmp_path / "r2")


def test_collapse_and_finite_divergence_stop_the_run(tmp_path, tiny_cfg, monkeypatch):
    from petra.kernels import fused_cross_entropy as real

    _patch_loss(monkeypatch, lambda h, w, t, chunk=4096: real(h, w, t, chunk) + 20.0)
    logs = []
    with pytest.raises(TrainingError, match="diverged: the loss has stayed above ln.vocab. . 1 = 8.62 for 3 steps"):
        train(tiny_cfg(**{"train.divergence_patience": 3}), tmp_path / "d", show_progress=False, log=logs.append)
    assert any("worse than a uniform guess" in line for line in logs)
    monkeypatch.undo()
    from petra.optim import LocalAdamW

    real_step = LocalAdamW.step

    def zero_step(self, closure=None, found_inf=None):  # a saturated network: every gradient exactly 0
        for g in self.param_groups:
            for p in g["params"]:
                p.grad.zero_()
        return real_step(self, closure, found_inf)

    monkeypatch.setattr(LocalAdamW, "step", zero_step)
    monkeypatch.setattr("petra.parallel.NoParallel.clip_grad_norm", lambda self, ps, c: torch.zeros(()))
    with pytest.raises(TrainingError, match="collapsed: the gradient norm has been exactly 0 for 4 steps"):
        train(tiny_cfg(**{"train.divergence_patience": 4}), tmp_path / "c", **quiet)


@pytest.mark.parametrize(
    "error",  # a full disk: an OSError, or from torch's zip writer a RuntimeError
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3"),
    ],
)
def test_a_save_that_fails_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_cfg, monkeypatch, error):
    real, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **k):  # the second checkpoint dies half-written
        calls["n"] += 1
        if calls["n"] == 2:
            open(f, "wb").write(b"PK\x03\x04 half")
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    run = tmp_path / "r"
    with pytest.raises(
        checkpoint.CheckpointError, match=r"failed \(.*; the last good checkpoint .* \(step 3\) is intact"
    ):
        train(tiny_cfg(**{"train.save_every": 3}), run, **quiet)
    monkeypatch.undo()
    assert not (run / "checkpoint.pt.tmp").exists()  # the partial file is not left on the full disk
    assert checkpoint.load(run)["step"] == 3
    train(None, run, resume=True, **quiet)  # and the run goes on from it


def test_startup_names_the_rank_and_a_resume_its_step(tmp_path, tiny_cfg):
    logs = []
    train(
        tiny_cfg(**{"method.name": "galore", "method.rank": 8, "train.stop_after": 5}),
        tmp_path / "r",
        show_progress=False,
        log=logs.append,
    )
    assert "method galore, rank 8," in logs[-2 if "stopped" in logs[-1] else -1] or any(
        "method galore, rank 8," in line for line in logs
    )
    logs.clear()
    train(None, tmp_path / "r", resume=True, show_progress=False, log=logs.append)
    assert any(f"resuming {tmp_path / 'r'} from step 5 of 12" in line for line in logs)


def test_existing_run_and_mismatched_resume_are_refused(tmp_path, tiny_cfg):
    run = tmp_path / "r"
    train(tiny_cfg(**{"train.stop_after": 3}), run, **quiet)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_cfg(), run, **quiet)
    with pytest.raises(ConfigError, match="cannot resume with train.lr=0.5"):
        train(tiny_cfg(**{"train.lr": 0.5}), run, resume=True, explicit={("train", "lr")}, **quiet)
    assert checkpoint.load(run)["step"] == 3


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path, tiny_cfg):
    run = tmp_path / "r"
    train(tiny_cfg(**{"train.stop_after": 3}), run, **quiet)
    ck = run / checkpoint.CKPT
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or incomplete"):
        train(None, run, resume=True, **quiet)
    assert ck.read_bytes() == data[: len(data) // 2]


def test_export_loads_in_transformers_with_matching_logits(tmp_path, tiny_cfg):
    transformers = pytest.importorskip("transformers")
    from petra.config import ModelConfig
    from petra.model import LlamaForCausalLM

    run = tmp_path / "r"
    train(tiny_cfg(**{"method.name": "relora", "method.rank": 8, "method.reset_interval": 5}), run, **quiet)
    checkpoint.export_hf(run, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    payload = checkpoint.load(run)
    ours = LlamaForCausalLM(ModelConfig(**payload["config"]["model"])).eval()
    ours.load_state_dict(checkpoint.plain_state_dict(payload))
    x = torch.randint(0, 2048, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)
    with pytest.raises(ConfigError, match="not an empty directory; nothing was written there"):
        checkpoint.export_hf(run, tmp_path / "hf")  # an export never writes into a directory with files


def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes(tmp_path, cache_dir, capsys):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    cmd = [
        sys.executable,
        "-m",
        "petra",
        "train",
        "--preset",
        "tiny",
        "--steps",
        "100000",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(run),
        "--no-progress",
        "--log-every",
        "1",
        "--save-every",
        "0",
        "--eval-every",
        "100000",
        "--set",
        f"data.cache_dir={cache_dir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    # while it runs, a second run or a resume of the directory is refused at once
    from petra.cli import main

    for argv in (["train", "--preset", "tiny", "--out", str(run)], ["train", "--resume", str(run)]):
        assert main(argv) == 2
    metrics_before = (run / "metrics.jsonl").read_text()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out  # a scheduler sees an interrupted run
    assert "interrupted at step" in out and "petra train --resume" in out
    assert metrics_before.splitlines()[:3] == (run / "metrics.jsonl").read_text().splitlines()[:3]
    step = checkpoint.load(run)["step"]
    assert step >= 3
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    # the lock went with the process: the run resumes
    from petra.config import build_config

    req = build_config(overrides={"preset": "tiny", "train.stop_after": step + 2})
    s = train(req, run, resume=True, explicit={("train", "stop_after")}, **quiet)
    assert s["step"] == step + 2 and s["status"] == "stopped"
    assert "in use by another petra process (pid " + str(proc.pid) in capsys.readouterr().err
