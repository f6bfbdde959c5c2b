"""petra's optimizers inside transformers' Trainer (examples/hf_trainer.py), resume included,
and param groups chosen as transformers' optim_target_modules chooses."""

import importlib.util
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from petra.optim import target_param_groups  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "hf_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["galore", "apollo-mini", "fira"])
def test_the_example_trains_with_each_optimizer(name, tmp_path, cache_dir):
    out = _example().main(["--optimizer", name, "--steps", "10", "--out", str(tmp_path), "--cache-dir", cache_dir])
    losses = out["losses"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5


def test_trainer_resumes_the_optimizer_state_exactly(tmp_path, cache_dir):
    ex = _example()
    args = ["--optimizer", "apollo-mini", "--steps", "8", "--cache-dir", cache_dir]
    whole = ex.main([*args, "--out", str(tmp_path / "a")])["losses"]
    ex.main([*args, "--out", str(tmp_path / "b")])
    shutil.rmtree(tmp_path / "b" / "checkpoint-8")  # as if stopped after the checkpoint of step 4
    resumed = ex.main([*args, "--out", str(tmp_path / "b"), "--resume"])
    after = [h["loss"] for h in resumed["log"] if "loss" in h and h["step"] > 4]
    assert after == pytest.approx(whole[4:], rel=1e-5)
    # another optimizer would be handed this one's saved state: refused, naming the one to use
    other = ["--optimizer", "galore", "--steps", "8", "--cache-dir", cache_dir, "--out", str(tmp_path / "b")]
    with pytest.raises(SystemExit, match="was trained with apollo-mini; resume with --optimizer apollo-mini"):
        ex.main([*other, "--resume"])


def test_target_param_groups_choose_as_optim_target_modules():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    low, rest = target_param_groups(model, ["attn", "mlp"], rank=4)
    assert low["rank"] == 4 and len(low["params"]) == 2 * 7 and "rank" not in rest
    assert not any("lm_head" in names[id(p)] or "embed" in names[id(p)] for p in low["params"])
    mlp = target_param_groups(model, r"model\.layers\.\d+\.mlp\.\w+_proj", rank=4)[0]["params"]
    assert {names[id(p)].split(".")[-2] for p in mlp} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="match no nn.Linear module"):
        target_param_groups(model, ["conv"], rank=4)
