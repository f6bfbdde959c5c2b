import copy

import pytest
import torch

from petra.dtensor import clip_grad_norm
from petra.optim import LocalAdamW


@pytest.mark.parametrize("kernels", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_local_adamw_is_torch_adamw_on_plain_tensors(kernels):
    """The same kernels as torch.optim.AdamW: equal parameters and an interchangeable state_dict."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    qs = copy.deepcopy(ps)
    a = LocalAdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, **kernels)
    b = torch.optim.AdamW(qs, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, **kernels)
    for i in range(6):
        for p, q in zip(ps, qs):
            p.grad = None if (i == 2 and p.dim() == 1) else torch.randn_like(p)  # a step without a grad
            q.grad = None if p.grad is None else p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    rs = copy.deepcopy(qs)
    c = torch.optim.AdamW(rs, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, **kernels)
    c.load_state_dict(a.state_dict())  # a checkpoint of either loads into the other
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert all(torch.equal(c.state[r][key], b.state[q][key]) for r, q in zip(rs, qs))


def test_clip_grad_norm_is_torch_clip_grad_norm():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    qs = copy.deepcopy(ps)
    for p, q in zip(ps, qs):
        p.grad = 3 * torch.randn_like(p)
        q.grad = p.grad.clone()
    norm = clip_grad_norm(ps, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(qs, 0.5)
    assert torch.equal(norm, ref)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps])) == pytest.approx(0.5, rel=1e-5)
    before = [p.grad.clone() for p in ps]
    assert torch.equal(clip_grad_norm(ps, 0.0), torch.nn.utils.get_total_norm(before))  # 0: measure only
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


def test_petra_optim_imports_with_torch_alone():
    """The optimizers are drop-in: importing them loads neither petra's config nor its
    process-group code (only the leaf that handles tensors that may be FSDP2 shards)."""
    import subprocess
    import sys

    code = "import sys, petra.optim; print(' '.join(sorted(m for m in sys.modules if m.startswith('petra'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "petra.optim.galore" in loaded
    assert not {"petra.config", "petra.distributed", "petra.methods", "petra.train"} & set(loaded), loaded


def test_petras_plain_adamw_is_torchs_and_takes_no_low_rank_group():
    """petra.optim.AdamW (what full-rank layer-wise training steps with) gives torch's
    numbers bit for bit with torch's defaults, and refuses a 'rank' group by name."""
    from petra.optim import AdamW

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours, ref = AdamW(ps, lr=1e-2), torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    with pytest.raises(ValueError, match="AdamW takes no low-rank groups"):
        AdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 2}])


def test_the_optimizers_choices_are_the_configs():
    """optim/ is importable without petra.config, so it declares its group options itself;
    they must be the config's."""
    from petra.config import CHOICES, MethodConfig
    from petra.optim import DEFAULT_TARGETS
    from petra.optim.galore import PROJ_TYPES, PROJECTORS, SWITCH_STATES

    assert (PROJ_TYPES, PROJECTORS, SWITCH_STATES) == tuple(
        CHOICES[f"method.{k}"] for k in ("proj_type", "projector", "switch_state")
    )
    assert MethodConfig().targets == DEFAULT_TARGETS
