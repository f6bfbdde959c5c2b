import pytest
import torch

from petra.config import PRESETS, ModelConfig, build_config
from petra.lora import lora_modules, merged_state_dict, prune_moments, wrap
from petra.methods import Method
from petra.methods.relora import ReLoRA
from petra.model import LlamaForCausalLM


def _wrapped(rank=8, alpha=16.0):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    wrap(model, r"(self_attn|mlp)\.\w+_proj", rank, alpha)
    return model


def test_wrapping_keeps_outputs_and_factors_learn_from_the_first_step():
    torch.manual_seed(0)
    plain = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    x = torch.randint(0, 2048, (2, 12))
    before = plain(x)
    wrap(plain, r"(self_attn|mlp)\.\w+_proj", 8, 16.0)
    assert len(lora_modules(plain)) == 2 * 7
    assert torch.allclose(plain(x), before, atol=1e-6)  # B = 0
    plain(x, x).backward()
    mod = lora_modules(plain)[0]
    assert mod.weight.grad is None and not mod.weight.requires_grad  # frozen: no weight gradient
    assert mod.lora_B.grad.abs().sum() > 0  # A is random, so B learns at once


def test_merge_leaves_outputs_unchanged_and_restarts_factors():
    model = _wrapped()
    for m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.05)
    x = torch.randint(0, 2048, (2, 12))
    before = model(x)
    w_before = lora_modules(model)[0].weight.clone()
    for m in lora_modules(model):
        m.merge()
        m.reset_factors(torch.Generator().manual_seed(1))
    assert torch.allclose(model(x), before, atol=1e-5)
    m0 = lora_modules(model)[0]
    assert not torch.equal(m0.weight, w_before) and m0.lora_B.abs().sum() == 0


def test_merged_state_dict_is_a_plain_llama():
    model = _wrapped(rank=4, alpha=8.0)
    for m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.05)
    x = torch.randint(0, 2048, (2, 12))
    plain = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    plain.load_state_dict(merged_state_dict(model.state_dict(), 8.0 / 4))
    assert torch.allclose(plain(x), model(x), atol=1e-5)


@pytest.mark.parametrize("mode, frac, expected", [("magnitude", 0.9, 0.9), ("random", 0.5, 0.5), ("reset", 0.99, 1.0)])
def test_optimizer_pruning_reports_what_it_zeroed(mode, frac, expected):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(64, 64)
    opt.step()
    big = opt.state[p]["exp_avg"].abs().max()
    zeroed = prune_moments(opt, [p], mode, frac, torch.Generator().manual_seed(0))
    assert zeroed == pytest.approx(expected, abs=0.03)
    if mode == "magnitude":  # the largest moments survive
        assert opt.state[p]["exp_avg"].abs().max() == big


def test_restart_steps_follow_warm_start_and_interval():
    cfg = build_config(
        overrides={
            "preset": "tiny",
            "method.name": "relora",
            "train.steps": 100,
            "method.warm_start_steps": 20,
            "method.reset_interval": 25,
            "method.restart_warmup_steps": 5,
        }
    )
    r = ReLoRA(cfg)
    assert r.restarts() == [20, 45, 70, 95]
    envelope = Method(cfg).lr_factor  # plain cosine
    assert r.lr_factor(45) == 0.0
    assert r.lr_factor(47) == pytest.approx(0.4 * envelope(47))
    assert r.lr_factor(50) == envelope(50) and r.lr_factor(44) == envelope(44)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_frozen_weight_merge_dequantizes_adds_and_requantizes(kind):
    pytest.importorskip("bitsandbytes")
    from petra.lora import dequantize_weight, quantize_weight

    model = _wrapped()
    mod = lora_modules(model)[4]  # an MLP projection, 176 x 64
    w = mod.weight.detach().clone()
    mod.quantize(kind)
    assert "weight" not in dict(mod.named_parameters()) and mod.weight_q.dtype in (torch.int8, torch.uint8)
    deq = mod.frozen_weight()
    step = (w.abs().max() / (127 if kind == "int8" else 7)).item()  # a coarse bound on one code step
    assert (deq - w).abs().max() <= step and not torch.equal(deq, w)
    with torch.no_grad():
        mod.lora_B.normal_(std=0.05)
    x = torch.randn(3, w.shape[1], requires_grad=True)
    before = mod(x)
    # backward: the input gradient of the dequantized weight, no gradient for the codes
    before.sum().backward()
    lora = mod.lora_B @ mod.lora_A * mod.scale
    torch.testing.assert_close(x.grad, torch.ones(3, w.shape[0]) @ (deq + lora), rtol=1e-4, atol=1e-5)
    expect = quantize_weight((deq.float() + (mod.lora_B.float() @ mod.lora_A.float()) * mod.scale).to(w.dtype), kind)
    mod.merge()
    assert torch.equal(mod.weight_q, expect[0]) and torch.equal(mod.weight_scale, expect[1])
    mod.reset_factors(torch.Generator().manual_seed(1))
    after = mod(x)
    # the merge moved the function by at most the rounding of the requantized delta
    merged = dequantize_weight(mod.weight_q, mod.weight_scale, kind, w.shape, w.dtype)
    torch.testing.assert_close(after, x @ merged.t())
    target = deq + lora
    new_step = (target.abs().max() / (127 if kind == "int8" else 7)).item()
    assert (merged - target).abs().max() <= new_step
    assert (after - before).abs().max() <= new_step * x.abs().sum(1).max()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_relora_trains_resumes_and_exports(tmp_path, tiny_cfg, kind):
    pytest.importorskip("bitsandbytes")
    from petra import checkpoint
    from petra.metrics import read_metrics
    from petra.train import train

    quiet = dict(show_progress=False, log=lambda *a: None)
    ov = {
        "method.name": "relora",
        "method.rank": 8,
        "method.reset_interval": 3,
        "method.warm_start_steps": 3,
        "method.restart_warmup_steps": 1,
        "method.quantize": kind,
    }
    s = train(tiny_cfg(**ov), tmp_path / "a", **quiet)
    assert s["status"] == "finished" and kind in s["optimizer"]
    train(tiny_cfg(**ov, **{"train.stop_after": 7}), tmp_path / "b", **quiet)
    train(None, tmp_path / "b", resume=True, **quiet)
    losses = [[r["loss"] for r in read_metrics(tmp_path / r / "metrics.jsonl") if "loss" in r] for r in "ab"]
    assert losses[0] == losses[1] and all(v == v for v in losses[0])
    state = checkpoint.load(tmp_path / "a")["model"]
    assert any(k.endswith("weight_q") for k in state)
    plain = checkpoint.plain_state_dict(checkpoint.load(tmp_path / "a"))
    model = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    model.load_state_dict(plain)  # a plain LLaMA: every weight dequantized with its factors merged


def test_quantize_needs_relora():
    from petra.config import ConfigError

    with pytest.raises(ConfigError, match="needs method.name=relora"):
        build_config(overrides={"preset": "tiny", "method.name": "galore", "method.quantize": "nf4"})


def test_warm_start_from_a_full_rank_run(tmp_path, tiny_cfg):
    from petra import checkpoint
    from petra.config import ConfigError
    from petra.data import Batches, prepare
    from petra.metrics import read_metrics
    from petra.train import train

    quiet = dict(show_progress=False, log=lambda *a: None)
    cfg = tiny_cfg(**{"train.steps": 6})
    train(cfg, tmp_path / "full", **quiet)
    ov = {
        "method.name": "relora",
        "method.rank": 8,
        "method.reset_interval": 3,
        "train.init_from": str(tmp_path / "full"),
    }
    train(tiny_cfg(**ov), tmp_path / "r", **quiet)
    # the first ReLoRA step's loss is the full-rank run's final model on that batch (B = 0)
    model = LlamaForCausalLM(cfg.model)
    model.load_state_dict(checkpoint.load(tmp_path / "full")["model"])
    data = prepare(cfg.data, cfg.model.vocab_size)
    x, y = Batches(data.train, cfg.seq_len, cfg.train.batch_size, cfg.train.seed).get(0)
    first = next(r["loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r)
    with torch.no_grad():
        assert first == pytest.approx(float(model(x, y)), abs=1e-4)
    with pytest.raises(ConfigError, match="does not fit this model"):
        train(tiny_cfg(**{**ov, "model.hidden_size": 128}), tmp_path / "bad", **quiet)
    with pytest.raises(ConfigError, match="neither a petra run directory"):  # bad input: exit 2
        train(tiny_cfg(**{**ov, "train.init_from": str(tmp_path / "nothing")}), tmp_path / "bad2", **quiet)


def _steps_after_a_merge(joint: bool, lr=1e-3):
    """The largest |change| of any LoRA factor entry in the two steps after a merge, in units of lr."""
    torch.manual_seed(0)
    model = _wrapped()
    lora = [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(lora, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def step():
        x = torch.randint(0, 2048, (4, 16), generator=g)
        opt.zero_grad()
        model(x, x).backward()
        opt.step()

    for _ in range(30):
        step()
    for m in lora_modules(model):
        m.merge()
        m.reset_factors(torch.Generator().manual_seed(1))
    prune_moments(opt, lora, "magnitude", 0.99, joint=joint)
    worst = 0.0
    for _ in range(2):
        before = [p.detach().clone() for p in lora]
        step()
        worst = max(worst, max(float((p.detach() - b).abs().max()) for p, b in zip(lora, before)) / lr)
    return worst


def test_joint_pruning_bounds_the_first_steps_after_a_merge():
    # exact Adam never moves an entry by more than lr * 7.3 (betas 0.9, 0.999; see
    # optim.galore.adam_step_bound); independent masks leave m where v is zeroed: lr * m / eps
    from petra.optim.functional import adam_step_bound

    joint, independent = _steps_after_a_merge(True), _steps_after_a_merge(False)
    assert joint <= adam_step_bound(0.9, 0.999, 1000)
    assert independent > 100 * joint


def test_joint_pruning_zeroes_both_moments_at_the_same_places():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([p])
    for _ in range(3):
        p.grad = torch.randn(64, 64)
        opt.step()
    for mode in ("magnitude", "random"):
        prune_moments(opt, [p], mode, 0.9, torch.Generator().manual_seed(0))
        st = opt.state[p]
        assert torch.equal(st["exp_avg"] == 0, st["exp_avg_sq"] == 0)


def test_old_configs_keep_independent_pruning_on_resume():
    from petra.config import from_dict

    cfg = build_config(overrides={"preset": "tiny", "method.name": "relora"})
    assert cfg.method.prune_mask == "joint"
    d = cfg.to_dict()
    del d["method"]["prune_mask"]  # a run saved before the option existed
    assert from_dict(d).method.prune_mask == "independent"
