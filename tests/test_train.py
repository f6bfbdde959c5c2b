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


@pytest.mark.parametrize("method, extra", [
    ("full", {}),
    ("galore", {"method.rank": 8, "method.update_proj_gap": 5, "method.projector": "randomized"}),
    ("relora", {"method.rank": 8, "method.reset_interval": 4, "method.warm_start_steps": 3,
                "method.restart_warmup_steps": 2}),
])
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


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    import petra.model as pm
    real, calls = pm.fused_cross_entropy, {"n": 0}

    def poisoned(h, w, t, chunk=4096):  # the 8th training forward (step 7) returns NaN
        calls["n"] += 1
        loss = real(h, w, t, chunk)
        return loss * float("nan") if calls["n"] == 8 else loss
    monkeypatch.setattr(pm, "fused_cross_entropy", poisoned)
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match="loss is nan at step 7"):
        train(tiny_cfg(**{"train.save_every": 3, "train.eval_every": 100}), run, **quiet)
    payload = checkpoint.load(run)  # the checkpoint of step 6, intact and loadable
    assert payload["step"] == 6
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


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
    from petra.model import LlamaForCausalLM
    from petra.config import ModelConfig
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
    with pytest.raises(checkpoint.CheckpointError, match="not empty"):
        checkpoint.export_hf(run, tmp_path / "hf")


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, cache_dir):
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "petra", "train", "--preset", "tiny", "--steps", "100000", "--batch-size", "2",
           "--seq-len", "32", "--out", str(run), "--no-progress", "--log-every", "1", "--save-every", "0",
           "--eval-every", "100000", "--set", f"data.cache_dir={cache_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted at step" in out and "petra train --resume" in out
    step = checkpoint.load(run)["step"]
    assert step >= 3
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
