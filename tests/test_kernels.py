"""train.kernels: the torch pieces and liger-kernel's compute the same model.

The liger tests need a GPU and liger-kernel (CI has neither; benchmarks/speed_table.sh part j
runs them on the device). On the CPU: the wiring (every norm, rotary embedding, SwiGLU and
the loss go through the chosen set, compiled or not) and the errors on bad input."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

import pytest
import torch

from petra import kernels as K
from petra.config import PRESETS, ConfigError, ModelConfig, build_config
from petra.model import LlamaForCausalLM, build_model

needs_liger = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("liger_kernel")),
    reason="needs a CUDA device and liger-kernel",
)


def counting(base: K.Kernels) -> tuple[K.Kernels, dict]:
    """`base` with every piece counting its calls."""
    calls = {}

    def wrap(name, fn):
        def f(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)

        return f

    pieces = {f.name: wrap(f.name, getattr(base, f.name)) for f in dataclasses.fields(base) if f.name != "name"}
    return K.Kernels("counting", **pieces), calls


def _tiny(layers=2, **cfg):
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig(**{**PRESETS["tiny"], "num_hidden_layers": layers, **cfg}))


@pytest.mark.parametrize("compiled", [False, True])
def test_use_kernels_routes_every_piece_and_loss_through_the_set(compiled):
    model, ref = _tiny(), _tiny()
    k, calls = counting(K.TORCH)
    model.use_kernels(k)
    if compiled:
        torch._dynamo.reset()
        model.compile_parts(True)  # the loss compiled on its own: the set's, not the default
        ref.compile_parts(True)
    x, y = torch.randint(0, 2048, (2, 16)), torch.randint(0, 2048, (2, 16))
    loss, want = model(x, y), ref(x, y)
    loss.backward()
    want.backward()
    # the same functions: bit for bit what the default model computes (compiled as it is)
    assert torch.equal(loss, want)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n
    if not compiled:  # (compiled, dynamo traces the calls once rather than making them)
        assert calls == {"rms_norm": 2 * 2 + 1, "rope": 2, "silu_mul": 2, "cross_entropy": 1}
    else:
        assert calls.get("cross_entropy", 0) >= 1 and calls.get("rms_norm", 0) >= 1
    model.compile_parts(False)
    assert model.loss_fn is k.cross_entropy
    model.use_kernels(K.TORCH)
    assert model.loss_fn is K.fused_cross_entropy and model.model.norm.kernels is K.TORCH


def test_the_configs_choices_are_the_kernel_sets():
    from petra.config import CHOICES

    assert CHOICES["train.kernels"] == K.KERNELS  # config stays torch-free, so it spells them again


def test_an_unknown_kernel_set_is_refused():
    with pytest.raises(ValueError, match="kernels='triton' is not allowed; choose one of: torch, liger"):
        K.kernels("triton")
    with pytest.raises(ConfigError, match="train.kernels='triton' is not allowed; choose one of: torch, liger"):
        build_config(overrides={"train.kernels": "triton"})


def test_liger_without_the_package_or_without_cuda_fails_before_any_work(monkeypatch, tmp_path, tiny_cfg):
    from petra.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"train.kernels=liger needs liger-kernel \(pip install 'petra\[liger\]'\)"):
        build_config(overrides={"train.kernels": "liger"})
    monkeypatch.undo()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a)
    )
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.10")
    with pytest.raises(ConfigError, match=r"needs liger-kernel >= 0.8, this environment has 0.5.10"):
        build_config(overrides={"train.kernels": "liger"})
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.5")
    with pytest.raises(ConfigError, match="train.kernels=liger runs Triton kernels on CUDA, not on cpu"):
        train(tiny_cfg(**{"train.kernels": "liger", "train.device": "cpu"}), tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_a_resume_may_switch_kernels():
    from petra.config import config_changes

    a = build_config(overrides={"preset": "tiny"}).to_dict()
    b = build_config(overrides={"preset": "tiny", "train.kernels": "torch"}).to_dict()
    b["train"]["kernels"] = "liger"  # (the package need not be here to compare configs)
    assert config_changes(a, b) == []


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_pieces_equal_torchs(dtype):
    lig, ref = K.kernels("liger"), K.TORCH
    torch.manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}

    def both(fn_a, fn_b, *inputs):
        outs = []
        for fn in (fn_a, fn_b):
            xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = fn(*xs)
            out = out if isinstance(out, tuple) else (out,)
            sum((o.float() * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum() for o in out).backward()
            outs.append([o.detach().float() for o in out] + [x.grad.float() for x in xs if x.grad is not None])
        for a, b in zip(*outs):
            assert torch.allclose(a, b, **tol), (a - b).abs().max()

    x = torch.randn(4, 32, 256, device="cuda", dtype=dtype)
    w = torch.rand(256, device="cuda", dtype=dtype) + 0.5
    both(lambda x, w: lig.rms_norm(x, w, 1e-6), lambda x, w: ref.rms_norm(x, w, 1e-6), x, w)
    q = torch.randn(4, 32, 8, 64, device="cuda", dtype=dtype).transpose(1, 2)  # (B, H, T, D) as a view
    k = torch.randn(4, 32, 8, 64, device="cuda", dtype=dtype).transpose(1, 2)
    from petra.model import rope_cache

    cos, sin = (t.to("cuda", dtype) for t in rope_cache(32, 64, 10000.0))
    both(lambda q, k: lig.rope(q, k, cos, sin), lambda q, k: ref.rope(q, k, cos, sin), q, k)
    a, b = torch.randn(2, 2, 3, 32, 688, device="cuda", dtype=dtype).unbind(0)
    both(lig.silu_mul, ref.silu_mul, a, b)
    h, wv = torch.randn(2, 64, 128, device="cuda", dtype=dtype), torch.randn(1000, 128, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (2, 64), device="cuda")
    t[0, :5] = -100  # ignored positions
    both(lambda h, wv: lig.cross_entropy(h, wv, t), lambda h, wv: ref.cross_entropy(h, wv, t), h, wv)


@needs_liger
@pytest.mark.parametrize("compiled", [False, True])
def test_a_model_on_liger_kernels_trains_like_the_torch_one(compiled):
    """The same bf16 model, both sets, compiled as training compiles it: the losses over a few
    AdamW steps and the first step's gradients agree to bf16's precision; 1b's MLP width (not
    a multiple of 8) takes the aligned path."""
    cfg = ModelConfig(**{**PRESETS["tiny"], "num_hidden_layers": 2, "intermediate_size": 171})
    losses, grads = [], []
    for name in ("torch", "liger"):
        torch.manual_seed(0)
        model = build_model(cfg, "cuda", torch.bfloat16)
        model.use_kernels(K.kernels(name))
        fwd = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator(device="cuda").manual_seed(1)
        run = []
        for i in range(4):
            x = torch.randint(0, 2048, (4, 64), device="cuda", generator=g)
            loss = fwd(x[:, :-1], x[:, 1:])
            loss.backward()
            if i == 0:
                grads.append({n: p.grad.float().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2), losses
    for n, a in grads[0].items():
        b = grads[1][n]
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-2 * a.abs().max().item()), (n, (a - b).abs().max())
