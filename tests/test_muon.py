"""petra's Muon: stacked, aligned Newton-Schulz against torch.optim.Muon."""

import pytest
import torch

from petra.optim.functional import newton_schulz
from petra.optim.muon import Muon

SHAPES = [(48, 80), (48, 80), (48, 80), (80, 48), (80, 48), (64, 64), (33, 70)]  # stacks, a tall stack, singles


def _run(opt_cls, steps=5, **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


def test_stacked_muon_follows_torch_muon_over_several_steps():
    ours, theirs = _run(Muon), _run(torch.optim.Muon)
    for a, b, s in zip(ours, theirs, SHAPES):
        # bf16 Newton-Schulz: a batched product may round differently from a single one
        assert (a - b).abs().max() < 2e-3, s


def test_a_stack_is_each_matrix_orthogonalized_on_its_own():
    torch.manual_seed(0)
    u = torch.randn(4, 48, 80)
    stacked = newton_schulz(u)
    for i in range(4):
        assert torch.allclose(stacked[i].float(), newton_schulz(u[i]).float(), atol=1e-2)


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)])
def test_zero_padding_to_an_aligned_width_changes_nothing_but_rounding(shape):
    torch.manual_seed(0)
    u = torch.randn(shape)
    plain, padded = newton_schulz(u, align=1), newton_schulz(u, align=64)
    assert padded.shape == plain.shape
    assert torch.allclose(padded.float(), plain.float(), atol=1e-2)
    # the result is near-orthogonal either way: singular values close to 1
    s = torch.linalg.svdvals(padded.float())
    assert s.min() > 0.5 and s.max() < 1.3


def test_fp32_momentum_for_bf16_weights_rounds_only_the_stored_buffer():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 64, dtype=torch.bfloat16))
    opt = Muon([w], lr=1e-2, moment_dtype=torch.float32)
    g = torch.randn(32, 64, dtype=torch.bfloat16)
    w.grad = g
    opt.step()
    buf = opt.state[w]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, g.float() * (1 - 0.95))
