"""petra's Adam-mini against the adam-mini package (v1.1.1), its reference, on CPU; its
FSDP2 form is in test_distributed.py (test_sharded_optimizers_equal_one_process)."""

import copy

import pytest
import torch
from conftest import dispatched

from petra.config import PRESETS, ModelConfig
from petra.model import build_model
from petra.optim.adam_mini import AdamMini, block_kind


def test_the_partition_is_the_packages_by_name():
    kinds = {
        "model.embed_tokens.weight": "row",
        "lm_head.weight": "row",
        "model.layers.0.self_attn.q_proj.weight": "head",
        "model.layers.0.self_attn.k_proj.weight": "head",
        "model.layers.0.self_attn.v_proj.weight": "row",
        "model.layers.0.self_attn.o_proj.weight": "row",
        "model.layers.0.mlp.down_proj.weight": "row",
        "model.layers.0.input_layernorm.weight": "tensor",
        "model.norm.weight": "tensor",
        "encoder.proj.bias": "adam",
    }
    assert {n: block_kind(n) for n in kinds} == kinds


def _package(adam_mini, model, cfg, wd):
    return adam_mini.Adam_mini(
        model.named_parameters(),
        lr=1e-2,
        weight_decay=wd,
        dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_attention_heads,
        verbose=False,
    )


def _ours(model, cfg, wd):
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return AdamMini(model.named_parameters(), lr=1e-2, weight_decay=wd, head_dim=head_dim)


def _steps(pairs, n, g, vocab):
    for _ in range(n):
        x = torch.randint(0, vocab, (2, 16), generator=g)
        for model, opt in pairs:
            opt.zero_grad()
            model(x, x).backward()
            opt.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_mini_follows_the_package_bit_for_bit(wd):
    adam_mini = pytest.importorskip("adam_mini")
    cfg = ModelConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    ours = build_model(cfg, "cpu", torch.float32)
    ref = copy.deepcopy(ours)
    a, b = _ours(ours, cfg, wd), _package(adam_mini, ref, cfg, wd)
    _steps([(ours, a), (ref, b)], 5, torch.Generator().manual_seed(1), cfg.vocab_size)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    # one second-moment value per head, row or tensor: the state is a little over half Adam's
    moments = sum(t.numel() for st in a.state.values() for k, t in st.items() if k in ("m", "v", "vmean"))
    n = sum(p.numel() for p in ours.parameters())
    assert n < moments < 1.1 * n


def test_a_state_the_package_saved_goes_on_in_petras_adam_mini():
    """Runs of earlier petra versions trained adam-mini with the package: their checkpoints resume."""
    adam_mini = pytest.importorskip("adam_mini")
    cfg = ModelConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    ref = build_model(cfg, "cpu", torch.float32)
    b = _package(adam_mini, ref, cfg, 0.1)
    g = torch.Generator().manual_seed(1)
    _steps([(ref, b)], 3, g, cfg.vocab_size)
    ours = copy.deepcopy(ref)
    a = _ours(ours, cfg, 0.1)
    a.load_state_dict(copy.deepcopy(b.state_dict()))
    _steps([(ours, a), (ref, b)], 3, g, cfg.vocab_size)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_the_host_issues_few_operations_per_parameter():
    """Parameters alike update in multi-tensor kernels: per parameter only its block means
    (g * g and a mean: no multi-tensor form) are operations of their own (one parameter at a
    time, the host issued about a dozen small operations each; a GPU waited on them)."""

    def ops(k):
        named = [(f"layers.{i}.mlp.up_proj.weight", torch.nn.Parameter(torch.randn(8, 4))) for i in range(k)]
        named += [(f"layers.{i}.self_attn.q_proj.weight", torch.nn.Parameter(torch.randn(8, 4))) for i in range(k)]
        opt = AdamMini(named, lr=1e-2, weight_decay=0.1, head_dim=2)
        for step in range(2):
            for _, p in named:
                p.grad = torch.randn(8, 4)
            if step == 0:
                opt.step()
        return dispatched(opt.step)

    assert ops(16) - ops(4) <= 2 * 2 * 12
