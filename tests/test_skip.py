"""A step whose gradient is not finite is skipped on the device (`step(found_inf=...)`):
the host never waits for the flag, and the run's weights and state are bit for bit those of
a run that never saw the step."""

import copy

import pytest
import torch
from conftest import DEVICES

from petra.optim import (
    APOLLO_MINI_GROUP,
    AdamW,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LocalAdamW,
)
from petra.optim.adam_mini import AdamMini
from petra.optim.chain import OptimizerChain
from petra.optim.muon import Muon

KINDS = ["galore", "galore-torch", "8bit", "adafactor", "apollo", "apollo-mini", "fira", "adamw", "muon", "adam-mini"]
# projected (32, 128) and (128, 32) moments and the (64, 64) dense one are 8-bit in "8bit"
SHAPES = [(48, 128), (128, 48), (64, 64), (48, 128), (64, 64), (40,)]


def _params(device, dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES]


def _build(kind, params):
    low, dense = params[:4], params[4:]
    # refreshes are staggered over a short gap, so the skipped steps include refresh steps
    group = {"params": low, "rank": 32, "update_proj_gap": 3, "stagger_refresh": True}
    groups = [group, {"params": dense}]
    if kind == "adamw":
        return AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "muon":  # as the muon method builds it: Muon for matrices, torch's fused AdamW for the rest
        return OptimizerChain(Muon(params[:5], lr=1e-2), LocalAdamW(params[5:], lr=1e-2, fused=True))
    if kind == "adam-mini":  # every block kind but biases: heads of q and k, rows, one per tensor
        names = ["q_proj", "mlp.down_proj", "o_proj", "k_proj", "v_proj", "norm"]
        return AdamMini(zip(names, params), lr=1e-2, weight_decay=0.1, head_dim=16)
    if kind == "apollo-mini":
        group.update(APOLLO_MINI_GROUP)
    if kind == "galore-torch":
        group["projector"] = "svd"  # as galore-torch
        return GaLoreAdamW(groups, lr=1e-2, eps=1e-6, weight_decay=0.1, convention="galore-torch")
    if kind == "adafactor":
        return GaLoreAdafactor(groups, lr=1e-2, beta1=0.9, weight_decay=0.1)
    cls = {"galore": GaLoreAdamW, "8bit": GaLoreAdamW8bit, "apollo": ApolloAdamW, "fira": FiraAdamW}
    return cls[kind.removesuffix("-mini")](groups, lr=1e-2, weight_decay=0.1)


def _grads(n, device, dtype):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES] for _ in range(n)]


def _bad(device, dtype):
    gs = [torch.zeros(s, device=device, dtype=dtype) for s in SHAPES]
    gs[0][3, 5], gs[1][0, 0], gs[5][2] = float("nan"), float("inf"), float("-inf")
    return gs


def _step(opt, params, grads, found_inf=None):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if found_inf is None:
        opt.step()
    else:
        opt.step(found_inf=torch.full((), float(found_inf), device=params[0].device))


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "codes"):  # 8-bit state
        return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _assert_same_run(pa, oa, pb, ob):
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert _same(oa.state_dict(), ob.state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_step_that_may_be_skipped_on_the_device_is_the_plain_step(kind, dtype, device):
    pa = _params(device, dtype)
    pb = copy.deepcopy(pa)
    oa, ob = _build(kind, pa), _build(kind, pb)
    for gs in _grads(7, device, dtype):
        _step(oa, pa, gs)
        _step(ob, pb, gs, found_inf=0)
    _assert_same_run(pa, oa, pb, ob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_skipped_steps_leave_no_trace_and_do_not_wait_for_the_flag(kind, dtype, monkeypatch):
    good = _grads(7, "cpu", dtype)
    pa = _params("cpu", dtype)
    pb = copy.deepcopy(pa)
    oa, ob = _build(kind, pa), _build(kind, pb)
    for gs in good:
        _step(oa, pa, gs)

    def no_host_read(self):
        raise AssertionError("a skipped step read a tensor's value on the host")

    # skipped: the very first step (decided on the host: it creates the state), refresh steps
    # of the staggered matrices (step counts 3 and 4), and two in a row
    bad_before = {0: 1, 3: 2, 5: 1}
    for i, gs in enumerate(good):
        for _ in range(bad_before.get(i, 0)):
            with monkeypatch.context() as m:
                if i > 0:
                    m.setattr(torch.Tensor, "__bool__", no_host_read)
                _step(ob, pb, _bad("cpu", dtype), found_inf=1)
        _step(ob, pb, gs, found_inf=0)
    _assert_same_run(pa, oa, pb, ob)


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_does_not_sync_with_the_device(device):
    if device != "cuda":
        pytest.skip("host-device syncs exist on CUDA")
    pa = _params(device, torch.bfloat16)
    pb = copy.deepcopy(pa)
    oa, ob = _build("8bit", pa), _build("8bit", pb)
    good = _grads(5, device, torch.bfloat16)
    for i, gs in enumerate(good):
        _step(oa, pa, gs)
        if i >= 2:  # state exists and the 8-bit update is compiled: nothing left to decide on the host
            bad = _bad(device, torch.bfloat16)  # (writing NaN into a CUDA tensor from Python syncs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                _step(ob, pb, bad, found_inf=1)
                _step(ob, pb, gs, found_inf=0)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            _step(ob, pb, gs, found_inf=0)
    _assert_same_run(pa, oa, pb, ob)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("adamw", "muon")])  # (Muon counts no steps)
def test_a_step_reads_no_flag_of_its_own(kind):
    """The flag of the step in progress reaches the host only at the next step: reading it
    during the step (as the projection of a matrix left out of a stack once did) makes the
    host wait for backward on every step."""
    params = _params("cpu", torch.float32)
    opt = _build(kind, params)
    for i, gs in enumerate(_grads(5, "cpu", torch.float32)):
        _step(opt, params, gs, found_inf=0)
        if i == 0:  # the first step creates the state and decides on the host
            continue
        unread = [id(st) for *_, states in opt._skips.pending for st in states]
        assert sorted(unread) == sorted(id(opt.state[p]) for p in params)
