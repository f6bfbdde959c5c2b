"""int8 weights with stochastic rounding, and moments in another dtype (issue 36)."""

import pytest
import torch

from petra import checkpoint
from petra.config import PRESETS, ConfigError, ModelConfig, build_config
from petra.int8weights import BLOCK, Int8Weight, QuantizedLinear, dequantize, quantize, quantizer
from petra.methods import make_method
from petra.model import build_model
from petra.optim import AdamW, GaLoreAdamW
from petra.train import train

quiet = dict(show_progress=False, log=lambda *a: None)


def _blocks(n_blocks=4, seed=0):
    """Blocks whose absmax is element 0 (1.0), the rest inside (-0.5, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n_blocks, BLOCK, generator=g) - 0.5
    w[:, 0] = 1.0
    return w


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    w = _blocks()
    step = 1.0 / 127
    torch.manual_seed(0)
    n = 4000
    mean = sum(dequantize(*quantize(w, BLOCK, stochastic=True), torch.float32) for _ in range(n)) / n
    # each draw is within one step of w, so the mean's sd is below step / 2 / sqrt(n)
    assert (mean - w).abs().max() < 6 * step / 2 / n**0.5
    nearest = dequantize(*quantize(w, BLOCK, stochastic=False), torch.float32)
    assert (nearest - w).abs().max() > 0.4 * step  # some values sit near the middle of a step


def test_round_trip_error_is_bounded_per_block():
    w = torch.randn(64, 3 * BLOCK) * torch.logspace(-4, 1, 64)[:, None]  # blocks of very different sizes
    for stochastic, bound in ((False, 0.5), (True, 1.0)):
        codes, absmax = quantize(w, BLOCK, stochastic)
        assert codes.dtype == torch.int8 and codes.shape == w.shape and absmax.numel() == w.numel() // BLOCK
        err = (dequantize(codes, absmax, torch.float32) - w).reshape(-1, BLOCK).abs().amax(1)
        assert (err <= bound * absmax / 127 * (1 + 1e-5)).all()


def test_a_matrix_that_does_not_split_into_blocks_gets_one_absmax_per_row():
    w = Int8Weight.from_float(torch.randn(3, 100))
    assert w.absmax.shape == (3,)
    assert torch.allclose(w.dequantize(), dequantize(*quantize(w.dequantize(), 100, False), torch.float32))


@pytest.mark.parametrize("stochastic, moves", [(True, True), (False, False)])
def test_small_updates_accumulate_only_with_stochastic_rounding(stochastic, moves):
    torch.manual_seed(1)
    start = _blocks(8)
    w = Int8Weight.from_float(start, stochastic=stochastic)
    delta = torch.full_like(start, 0.1 / 127)  # a tenth of a quantization step
    delta[:, 0] = 0  # the absmax stays where it is
    for _ in range(200):
        w.add_(delta)
    drift = (w.dequantize() - Int8Weight.from_float(start).dequantize())[:, 1:].mean()
    expected = 200 * 0.1 / 127
    if moves:
        assert abs(drift - expected) < 0.1 * expected
    else:
        assert abs(drift) < 0.05 * expected


def test_an_update_is_one_rounding_of_the_fp32_result():
    w = Int8Weight.from_float(torch.randn(8, BLOCK))
    p, x = w.dequantize(), torch.randn(8, BLOCK) * 1e-3
    torch.manual_seed(5)
    w.addcmul_(x, x, value=-2.0)
    torch.manual_seed(5)
    codes, absmax = quantize(p.addcmul(x, x, value=-2.0), BLOCK, stochastic=True)
    assert torch.equal(w.codes, codes) and torch.equal(w.absmax, absmax)


def test_a_foreach_update_of_mixed_lists_updates_both_kinds():
    w, plain = Int8Weight.from_float(torch.randn(4, BLOCK)), torch.randn(4, BLOCK)
    before_w, before_p = w.dequantize(), plain.clone()
    torch._foreach_add_([plain, w], [torch.ones(4, BLOCK), torch.ones(4, BLOCK)])
    assert torch.equal(plain, before_p + 1)
    assert (w.dequantize() - before_w - 1).abs().max() <= w.absmax.max() / 127


def test_the_int8_model_is_the_quantized_plain_model_and_its_gradients_are_the_dequantized_ones():
    cfg = ModelConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    plain = build_model(cfg, "cpu", torch.float32)
    torch.manual_seed(0)
    q = build_model(cfg, "cpu", torch.float32, quantizer("stochastic"))
    lin = q.model.layers[1].mlp.down_proj
    assert isinstance(lin, QuantizedLinear) and isinstance(q.lm_head, torch.nn.Linear)
    ref = Int8Weight.from_float(plain.model.layers[1].mlp.down_proj.weight.detach())
    assert torch.equal(lin.weight.codes, ref.codes)
    assert torch.equal(q.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    # the plain model with the dequantized weights computes the same loss and gradients
    plain.load_state_dict(q.state_dict())
    x, y = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    plain(x, y).backward()
    q(x, y).backward()
    gq, gp = lin.weight.grad, plain.model.layers[1].mlp.down_proj.weight.grad
    assert type(gq) is torch.Tensor and torch.allclose(gq, gp, atol=1e-6)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("apollo-mini", {"method.layerwise": True, "train.grad_clip": 0.0, "method.moments": "bf16"}),
        ("galore", {"method.rank": 8, "method.update_proj_gap": 5, "method.layerwise": True}),  # clipped
        ("fira", {"method.rank": 8, "method.update_proj_gap": 5, "method.int8_block": 256}),
    ],
)
def test_resume_with_int8_weights_is_exact(tmp_path, tiny_cfg, method, extra):
    ov = {"method.name": method, "method.int8_weights": "stochastic", **extra}
    full = train(tiny_cfg(**ov), tmp_path / "a", **quiet)
    train(tiny_cfg(**ov, **{"train.stop_after": 7}), tmp_path / "b", **quiet)
    resumed = train(None, tmp_path / "b", resume=True, **quiet)
    assert resumed["val_loss"] == full["val_loss"]
    a, b = checkpoint.load(tmp_path / "a")["model"], checkpoint.load(tmp_path / "b")["model"]
    k = "model.layers.0.mlp.up_proj.weight"
    assert isinstance(a[k], Int8Weight) and torch.equal(a[k].codes, b[k].codes)
    assert a[k].absmax.numel() == a[k].numel() // extra.get("method.int8_block", BLOCK)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_run_saved_before_int8_block_resumes_with_its_blocks_of_256(tmp_path, tiny_cfg):
    import json

    ov = {"method.name": "galore", "method.rank": 8, "method.int8_weights": "stochastic", "method.int8_block": 256}
    full = train(tiny_cfg(**ov), tmp_path / "a", **quiet)
    train(tiny_cfg(**ov, **{"train.stop_after": 7}), tmp_path / "b", **quiet)
    saved = tmp_path / "b" / "config.json"  # as the first int8 runs wrote it and their checkpoints
    d = json.loads(saved.read_text())
    del d["method"]["int8_block"]
    saved.write_text(json.dumps(d))
    payload = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    del payload["config"]["method"]["int8_block"]
    torch.save(payload, tmp_path / "b" / "checkpoint.pt")
    assert train(None, tmp_path / "b", resume=True, **quiet)["val_loss"] == full["val_loss"]


def test_export_of_an_int8_run_loads_in_transformers_with_the_dequantized_logits(tmp_path, tiny_cfg):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(**{"method.name": "galore", "method.rank": 8, "method.int8_weights": "stochastic"})
    train(cfg, tmp_path / "run", **quiet)
    checkpoint.export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    q = build_model(cfg.model, "cpu", torch.float32, quantizer("stochastic"))
    q.load_state_dict(checkpoint.load(tmp_path / "run")["model"])
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, q(x), atol=1e-4)


@pytest.mark.parametrize(
    "ov, needle",
    [
        ({"method.name": "full", "method.int8_weights": "stochastic"}, "method.int8_weights=stochastic is for the"),
        ({"method.name": "relora", "method.int8_weights": "nearest"}, "not relora"),
        ({"method.name": "galore", "method.int8_weights": "yes"}, "method.int8_weights"),
        ({"method.name": "galore", "method.int8_weights": "stochastic", "train.compile": "on"}, "runs eagerly"),
        ({"method.name": "galore8bit", "method.moments": "bf16"}, "keeps 8-bit moments"),
        ({"method.name": "adam-mini", "method.moments": "fp32"}, "does not apply to adam-mini"),
        ({"method.name": "galore", "method.moments": "fp16"}, "method.moments"),
        ({"method.name": "galore", "method.int8_block": 100}, "method.int8_block must be a power of two"),
    ],
)
def test_bad_weight_and_moment_settings_are_named(tiny_overrides, ov, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(overrides={**tiny_overrides, **ov})


def test_int8_weights_refuse_several_processes(tiny_cfg):
    class TwoProcesses:
        active, sharded, world = True, False, 2

    cfg = tiny_cfg(**{"method.name": "galore", "method.int8_weights": "stochastic"})
    with pytest.raises(ConfigError, match="runs in one process"):
        make_method(cfg, TwoProcesses())


def test_bf16_moments_are_the_fp32_update_rounded_once():
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(16, 32))
    p16 = torch.nn.Parameter(p32.detach().clone())
    a = GaLoreAdamW([p32], lr=1e-2)
    b = GaLoreAdamW([p16], lr=1e-2, moment_dtype=torch.bfloat16)
    m = v = torch.zeros(16, 32, dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(16, 32)
        p32.grad, p16.grad = g.clone(), g.clone()
        a.step()
        b.step()
        m = m.float().lerp(g, 0.1).bfloat16()  # computed in fp32, rounded once per step
        v = (v.float() * 0.999 + 0.001 * g * g).bfloat16()
    st = b.state[p16]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(st["exp_avg"], m)
    assert torch.allclose(st["exp_avg_sq"].float(), v.float(), rtol=8e-3)  # one bf16 step at most
    assert torch.allclose(p16, p32, atol=5e-4) and not torch.equal(p16, p32)
    c = AdamW([torch.nn.Parameter(torch.ones(2))], moment_dtype=torch.bfloat16)
    assert c.moment_dtype is torch.bfloat16


def test_method_moments_reach_every_optimizer(tiny_cfg):
    for name in ("full", "galore", "apollo-mini", "muon", "relora"):
        cfg = tiny_cfg(**{"method.name": name, "method.moments": "bf16", "method.rank": 8})
        method = make_method(cfg)
        model = method.prepare(build_model(cfg.model, "cpu", torch.float32))
        opt = method.optimizer(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        method.step(model, opt)
        inner = getattr(opt, "optimizers", [opt])
        states = [s for o in inner for s in o.state.values()]
        moments = [v for s in states for k, v in s.items() if k in ("exp_avg", "exp_avg_sq", "momentum_buffer")]
        assert moments and all(m.dtype == torch.bfloat16 for m in moments), name


def test_the_build_frees_each_replaced_linear_before_creating_the_next():
    """So that the model never exists in its full-precision dtype at once (a 7b build under 12 GiB)."""
    import weakref

    hook, replaced, alive = quantizer("stochastic"), [], []

    def transform(name, m):
        alive.append(sum(r() is not None for r in replaced))
        new = hook(name, m)
        if new is not m:
            replaced.append(weakref.ref(m))
        return new

    build_model(ModelConfig(**PRESETS["tiny"]), "cpu", torch.float32, transform)
    assert len(replaced) == 14 and max(alive) == 0
