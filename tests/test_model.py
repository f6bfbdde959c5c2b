import pytest
import torch
import torch.nn.functional as F

from petra.config import PRESETS, ModelConfig
from petra.kernels import fused_cross_entropy
from petra.model import LlamaForCausalLM


@pytest.mark.parametrize("chunk", [8, 37, 64])  # several chunks; one (the weight gradient is one product)
def test_fused_cross_entropy_matches_plain_loss_and_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = -100  # ignored position
    loss = fused_cross_entropy(h, w, t, chunk=chunk)
    (loss * 2.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    (ref * 2.5).backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(gh, h.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, w.grad, rtol=1e-10, atol=1e-12)


def test_model_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    x = torch.randint(0, 2048, (2, 16))
    y = torch.randint(0, 2048, (2, 16))
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert torch.allclose(model(x, y), ref, atol=1e-5)


def test_causality():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    x = torch.randint(0, 2048, (1, 20))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 7) % 2048
    a, b = model(x), model(x2)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-3)


def test_init_std_and_parameter_names_match_hf():
    model = LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))
    names = set(dict(model.named_parameters()))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002


def test_same_logits_as_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    from petra.checkpoint import hf_config

    cfg = ModelConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        **{
            k: v
            for k, v in hf_config(cfg.__dict__, 0).items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4)


@pytest.mark.parametrize("how", ["whole", "parts"])
def test_compiled_model_gives_the_eager_loss_and_gradients(monkeypatch, recwarn, how):
    """The graphs torch.compile captures (the whole model, or each layer and the fused loss
    as under FSDP2) compute the eager loss and gradients. aot_eager runs the captured
    forward and backward graphs without generating kernels, so no C++ compiler is needed."""
    import functools

    from petra.compiling import compile_model

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**{**PRESETS["tiny"], "num_hidden_layers": 2}))
    x, y = torch.randint(0, 2048, (2, 16)), torch.randint(0, 2048, (2, 16))
    ref = model(x, y)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fwd = compile_model(model, lambda *a: None, parts_of=model if how == "parts" else None)
    loss = fwd(x, y)
    loss.backward()
    assert not [w for w in recwarn if "torch.compile failed" in str(w.message)]  # compiled, not the fallback
    if how == "parts":
        assert model.loss_fn is not fused_cross_entropy and all(
            layer._compiled_call_impl is not None for layer in model.model.layers
        )
    assert torch.allclose(loss, ref, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n
    model.compile_parts(False)
    assert model.loss_fn is fused_cross_entropy


def test_aligned_pad_only_for_widths_tensor_cores_cannot_take():
    from petra.model import aligned_pad

    assert [aligned_pad(w) for w in (5461, 171, 1376, 2736, 11008)] == [43, 21, 0, 0, 0]
    assert LlamaForCausalLM(ModelConfig(**PRESETS["tiny"])).model.layers[0].mlp.pad == 0  # 176


@pytest.mark.parametrize("compiled", [False, True])
def test_aligned_mlp_is_the_same_function_with_the_same_gradients(compiled):
    """The 1b MLP (width 5461) runs 43 zero units wider on CUDA: outputs, input gradients and
    weight gradients must be those of the plain MLP (also as a captured graph)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**{**PRESETS["tiny"], "intermediate_size": 171})).double()
    mlp = model.model.layers[0].mlp
    assert mlp.pad == 21
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    ref = mlp(x)  # on the CPU: the plain path
    (ref * torch.arange(64)).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    fn = torch.compile(mlp.aligned, backend="aot_eager") if compiled else mlp.aligned
    out = fn(x)
    (out * torch.arange(64)).sum().backward()
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip([x.grad] + [p.grad for p in mlp.parameters()], want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_padded_linear_gradients():
    from petra.model import PaddedLinear

    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # 3 inputs + 2 padded ones
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: PaddedLinear.apply(x, w, 3, 2), (x, w))
    y = PaddedLinear.apply(x, w, 3, 2)
    assert y.shape == (4, 9) and torch.equal(y[:, 6:], torch.zeros(4, 3, dtype=torch.float64))
    assert torch.allclose(y[:, :6], x[:, :3] @ w.t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the aligned path runs on CUDA")
def test_aligned_mlp_runs_on_cuda_in_bf16():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**{**PRESETS["tiny"], "intermediate_size": 171})).cuda().bfloat16()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, 64, device="cuda", dtype=torch.bfloat16)
    plain = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.allclose(mlp(x).float(), plain.float(), rtol=2e-2, atol=2e-3)


def test_compiled_aligned_mlp_keeps_no_padded_weight_for_backward():
    """What a compiled forward saves for backward, as Inductor partitions it (min-cut): the
    weights themselves and the activations, never a padded copy of a weight (one for every
    MLP weight was 1.5 GiB at 1b)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved = []

    def forward_compiler(gm, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(tuple(a.meta["val"].shape) for a in out.args[0] if "val" in getattr(a, "meta", {}))
        return gm

    backend = aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm, partition_fn=min_cut_rematerialization_partition
    )
    torch.manual_seed(0)
    mlp = LlamaForCausalLM(ModelConfig(**{**PRESETS["tiny"], "intermediate_size": 171})).model.layers[0].mlp
    torch._dynamo.reset()
    torch.compile(mlp.aligned, backend=backend)(torch.randn(3, 5, 64, requires_grad=True)).sum().backward()
    assert (171, 64) in saved and (64, 171) in saved  # the parameters
    assert not {(192, 64), (64, 192)} & set(saved), saved
