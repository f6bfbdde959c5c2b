import copy
import io

import pytest
import torch
from conftest import DEVICES, dispatched

from petra.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, LayerwiseStepper, galore_param_groups
from petra.optim.projector import captured_energy, compute_basis, randomized_basis, subspace_basis, svd_basis


def naive_galore_adamw(w0, grads, rank, gap, lr, scale, b1=0.9, b2=0.999, eps=1e-8):
    """GaLore written step by step from the paper (Algorithm 2), float64, projecting the shorter side
    (a square matrix from the right, as galore-torch does).

    Singular vectors have arbitrary signs and, with moments kept across a refresh, the sign
    shows in the result; petra signs each vector to agree with the previous basis (largest
    entry positive on the first refresh), and so does this reference."""
    w = w0.clone().double()
    m = v = p = None
    left = w.shape[0] < w.shape[1]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new = u[:, :rank] if left else vh[:rank].t()
            if p is None:
                s = torch.sign(new.gather(0, new.abs().argmax(0)[None]).squeeze(0))
            else:
                s = torch.sign((p * new).sum(0))
            p = new * s
        r = p.t() @ g if left else g @ p
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        w -= lr * scale * (p @ n if left else n @ p.t())
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_galore_adamw_matches_naive_reference(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(7)]
    ref = naive_galore_adamw(w.detach(), grads, rank=4, gap=3, lr=0.01, scale=0.5)
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3, "scale": 0.5, "projector": "svd"}], lr=0.01)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    # petra keeps projectors in fp32; the reference is float64 throughout
    assert torch.allclose(w.detach(), ref, atol=1e-6)


def test_groups_without_rank_match_torch_adamw_exactly():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    qs = copy.deepcopy(ps)
    a = GaLoreAdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    b = torch.optim.AdamW(qs, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(6):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_rank_equal_to_short_side_is_full_adam_rotated():
    """With rank = min(m, n) the projection is a rotation; Adam's update differs from plain
    Adam (it is not rotation-invariant) but the first step's direction must equal sign-like Adam."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(6, 10, dtype=torch.float64))
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "scale": 1.0, "projector": "svd"}], lr=1.0)
    g = torch.randn(6, 10, dtype=torch.float64)
    w.grad = g
    opt.step()
    p = opt.state[w]["P"].double()
    r = p.t() @ g
    expected = -(p @ (r / (r.abs() + 1e-8)))
    assert torch.allclose(w.detach(), expected, atol=1e-9)


def test_one_dimensional_params_in_a_lowrank_group_get_plain_adamw():
    torch.manual_seed(0)
    b = torch.nn.Parameter(torch.randn(7))
    b2 = copy.deepcopy(b)
    opt = GaLoreAdamW([{"params": [b], "rank": 2}], lr=0.01)
    ref = torch.optim.AdamW([b2], lr=0.01, weight_decay=0.0, foreach=False)
    for _ in range(3):
        b.grad = torch.randn(7)
        b2.grad = b.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(b, b2) and "P" not in opt.state[b]


@pytest.mark.parametrize(
    "proj_type, keys, state_shape",
    [("left", {"P"}, (3, 20)), ("right", {"Q"}, (12, 3)), ("full", {"P", "Q"}, (3, 3)), ("std", {"P"}, (3, 20))],
)
def test_projection_types(proj_type, keys, state_shape):
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": proj_type}], lr=0.01)
    w.grad = torch.randn(12, 20)
    opt.step()
    st = opt.state[w]
    assert keys == {k for k in ("P", "Q") if k in st}
    assert st["exp_avg"].shape == state_shape


@pytest.mark.parametrize(
    "group, message",
    [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap=0"),
        ({"rank": 4, "ranks": 3}, "unknown param group key(s) ['ranks']"),
        ({"rank": 13}, "rank=13 exceeds the smaller side of a (12, 20) parameter"),
        ({"rank": 4, "proj_type": "diag"}, "proj_type='diag' is not allowed"),
        ({"rank": 4, "projector": "qr"}, "projector='qr' is not allowed"),
    ],
)
def test_invalid_group_keys_fail_clearly(group, message):
    w = torch.nn.Parameter(torch.randn(12, 20))
    with pytest.raises(ValueError) as e:
        GaLoreAdamW([{"params": [w], **group}])
    assert message in str(e.value)


def test_rank_above_short_side_allowed_with_full_projection():
    """A gradient has rank <= min(m, n), so each side's basis is capped there."""
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 16, "proj_type": "full"}])
    w.grad = torch.randn(12, 20)
    opt.step()
    assert opt.state[w]["P"].shape == (12, 12) and opt.state[w]["Q"].shape == (20, 12)


def _lowrank_matrix(m, n, r, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    return a + noise * torch.randn(m, n, generator=g)


def test_randomized_and_warm_subspace_capture_the_svd_energy():
    g = _lowrank_matrix(64, 96, 8)
    exact = captured_energy(g, svd_basis(g, 8))
    assert captured_energy(g, randomized_basis(g, 8)) == pytest.approx(exact, rel=1e-4)
    # warm start from a perturbed basis of a slightly changed gradient
    prev = svd_basis(g, 8)
    g2 = g + 0.05 * _lowrank_matrix(64, 96, 8, seed=1)
    e2 = captured_energy(g2, svd_basis(g2, 8))
    assert captured_energy(g2, subspace_basis(g2, prev)) == pytest.approx(e2, rel=1e-2)


def test_non_finite_gradient_keeps_previous_projector_and_never_raises(caplog):
    g = torch.randn(10, 14)
    prev = svd_basis(g, 3)
    bad = g.clone()
    bad[0, 0] = float("nan")
    out = compute_basis(bad, 3, "svd", prev)
    assert torch.equal(out, prev)
    first = compute_basis(bad, 3, "randomized", None)  # nothing to keep: a random orthonormal basis
    assert torch.allclose(first.t() @ first, torch.eye(3), atol=1e-5)
    assert "not finite" in caplog.text


@pytest.mark.parametrize("mode", ["keep", "reproject", "reset"])
def test_switch_state_modes(mode):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2, "switch_state": mode}], lr=0.01)
    for i in range(2):
        w.grad = torch.randn(8, 12)
        opt.step()
    before = opt.state[w]["exp_avg"].clone()
    w.grad = torch.randn(8, 12)  # step 3 refreshes the projector, then updates
    p_old = opt.state[w]["P"].clone()
    opt.step()
    st = opt.state[w]
    r = st["P"].t() @ w.grad
    if mode == "keep":
        assert torch.allclose(st["exp_avg"], 0.9 * before + 0.1 * r, atol=1e-6)
    elif mode == "reset":
        assert torch.allclose(st["exp_avg"], 0.1 * r, atol=1e-6) and int(st["moment_step"]) == 1
    else:
        c = st["P"].t() @ p_old
        assert torch.allclose(st["exp_avg"], 0.9 * (c @ before) + 0.1 * r, atol=1e-5)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 16))
    grads = [torch.randn(10, 16) for _ in range(8)]
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 3, "projector": "randomized"}], lr=0.01)
    for g in grads[:4]:
        w.grad = g.clone()
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[4:]:
        w.grad = g.clone()
        opt.step()
    w2 = torch.nn.Parameter(saved_w)
    opt2 = GaLoreAdamW([{"params": [w2], "rank": 3, "update_proj_gap": 3, "projector": "randomized"}], lr=0.01)
    opt2.load_state_dict(saved)
    assert all(torch.is_tensor(v) or isinstance(v, int) for v in saved["state"][0].values())
    for g in grads[4:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w, w2)


def test_8bit_tracks_fp32_and_stores_quantized_moments():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(128, 256))
    w8 = copy.deepcopy(w)
    a = GaLoreAdamW([{"params": [w], "rank": 32}], lr=1e-3)
    b = GaLoreAdamW8bit([{"params": [w8], "rank": 32}], lr=1e-3)
    start = w.detach().clone()
    for _ in range(5):
        g = torch.randn(128, 256)
        w.grad, w8.grad = g.clone(), g.clone()
        a.step()
        b.step()
    d32, d8 = w.detach() - start, w8.detach() - start
    assert torch.nn.functional.cosine_similarity(d32.flatten(), d8.flatten(), dim=0) > 0.99
    m = b.state[w8]["exp_avg"]
    assert type(m).__name__ == "OptimState8bit" and m.codes.dtype == torch.uint8


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_update_equals_torchao_subclass_ops(device):
    """The update on codes and scales (compiled on CUDA) equals the same math done through
    torchao's OptimState8bit: dequantize(), float ops, copy_() back."""
    from petra.optim.adam8bit import _optim_state_8bit, _update_8bit

    q = _optim_state_8bit()
    torch.manual_seed(0)
    r, m0 = torch.randn(64, 96, device=device), torch.randn(64, 96, device=device)
    v0 = torch.rand(64, 96, device=device)
    b1, b2, eps, bc2 = 0.9, 0.999, 1e-8, torch.tensor(0.3, device=device)
    bound = torch.tensor(1e30, device=device)  # no clipping here: it is tested on its own
    ours, ref = [], []
    for out in (ours, ref):
        m, v = (q.zeros(r.shape, signed=s, block_size=256, device=device) for s in (True, False))
        m.copy_(m0)
        v.copy_(v0)
        if out is ours:
            keep = torch.ones((), dtype=torch.bool, device=device)
            d = _update_8bit(m, v, r, b1, b2, eps, bc2, bound, keep, compiled=device == "cuda")
        else:
            m32 = m.dequantize().lerp(r, 1 - b1)
            v32 = v.dequantize().mul(b2).addcmul(r, r, value=1 - b2)
            m.copy_(m32)
            v.copy_(v32)
            d = m32 / (v32.sqrt() / bc2 + eps)
        out += [d, m.codes, m.scale, v.codes, v.scale]
    if device == "cpu":
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        return
    # compiled kernels round differently (fused multiply-adds): a code may land one step over
    assert torch.allclose(ours[0], ref[0], rtol=1e-5, atol=1e-7)
    for i in (1, 3):
        diff = (ours[i].int() - ref[i].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    for i in (2, 4):
        assert torch.allclose(ours[i], ref[i], rtol=1e-5)


def test_adafactor_factored_update_against_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(6, 9, dtype=torch.float64))
    opt = GaLoreAdafactor([w], lr=0.1)
    g = torch.randn(6, 9, dtype=torch.float64)
    w.grad = g
    opt.step()
    sq = g * g + 1e-30
    row, col = sq.mean(1), sq.mean(0)  # beta2t = 1 - 1^-0.8 = 0 at step 1
    u = g / torch.sqrt(torch.outer(row, col) / row.mean())
    u = u / max(1.0, float(u.pow(2).mean().sqrt()))
    assert torch.allclose(w.detach(), -0.1 * u, atol=1e-12)


def _tiny_model():
    from petra.config import PRESETS, ModelConfig
    from petra.model import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig(**PRESETS["tiny"]))


def _run_galore(layerwise: bool, clip: float, data):
    model = _tiny_model()
    # the standard path refreshes from the clipped gradient, the layer-wise one from the raw
    # gradient: equal bases up to rounding; exact SVD keeps that rounding smallest
    opt = GaLoreAdamW(galore_param_groups(model, 8, update_proj_gap=2, projector="svd"), lr=1e-2)
    lw = LayerwiseStepper(opt, grad_clip=clip) if layerwise else None
    norms = []
    for micro in data:
        for j, (x, y) in enumerate(micro):
            if lw:
                lw.armed = j == len(micro) - 1
            (model(x, y) / len(micro)).backward()
        if lw:
            norms.append(float(lw.finish()))
            assert all(p.grad is None for p in model.parameters())  # freed inside backward
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
            opt.step()
            opt.zero_grad()
    return model, norms


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_layerwise_equals_standard_step_with_accumulation_and_clipping(clip):
    torch.manual_seed(1)
    data = [[(torch.randint(0, 2048, (2, 16)), torch.randint(0, 2048, (2, 16))) for _ in range(3)] for _ in range(4)]
    ref, ref_norms = _run_galore(False, clip, data)
    lw, lw_norms = _run_galore(True, clip, data)
    assert lw_norms == pytest.approx(ref_norms, rel=1e-5)

    def gap(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    # equal up to float32 rounding (the gradient clipped before or after its projection;
    # matrices updated in stacks or one at a time). The bound is not a constant fitted to one
    # CPU's BLAS: it is what one rounding does to this computation on this machine, the
    # clipped run moved by a threshold one float32 ulp (2**-23) larger, with a margin of 10
    # (Adam's normalization amplifies the rounding of small coordinates by an amount that
    # depends on the BLAS's summation order)
    clipped, _ = _run_galore(False, 0.05, data) if not clip else (ref, None)
    nudged, _ = _run_galore(False, 0.05 * (1 + 2**-23), data)
    rounding = gap(clipped, nudged)
    assert gap(ref, lw) <= 10 * rounding, (gap(ref, lw), rounding)
    if clip:  # and the bound is tight enough to see clipping: without it the result moves far more
        unclipped, _ = _run_galore(True, 0.0, data)
        assert gap(ref, unclipped) > 100 * rounding


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_resume_of_a_bf16_model_keeps_fp32_moments_and_step_counts(cls):
    """torch's load_state_dict casts state to the parameter dtype; ours must not."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    n = torch.nn.Parameter(torch.ones(64).bfloat16())

    def make(ps):
        return cls([{"params": [ps[0]], "rank": 32}, {"params": [ps[1]]}], lr=1e-3)

    opt = make([w, n])
    grads = [(torch.randn(64, 128).bfloat16(), torch.randn(64).bfloat16()) for _ in range(6)]
    for g, gn in grads[:3]:
        w.grad, n.grad = g.clone(), gn.clone()
        opt.step()
    w2, n2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(n.detach().clone())
    opt2 = make([w2, n2])
    buf = io.BytesIO()  # through serialization, as a checkpoint goes
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    st = opt2.state[n2]
    assert st["exp_avg"].dtype == torch.float32 and st["moment_step"].dtype == torch.float32
    for g, gn in grads[3:]:
        w.grad, n.grad, w2.grad, n2.grad = g.clone(), gn.clone(), g.clone(), gn.clone()
        opt.step()
        opt2.step()
    assert torch.equal(w, w2) and torch.equal(n, n2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["GaLoreAdamW8bit", "GaLoreAdamW"])
def test_updates_in_chunks_equal_one_batched_update(monkeypatch, cls, device):
    """On CUDA the 8-bit update is compiled, and row blocks are views of the 8-bit moments."""
    import petra.optim

    torch.manual_seed(0)
    # the (512, 64) parameter has no projection and is larger than a chunk of 1000: it is
    # updated in two blocks of 256 rows (views of its weights and 8-bit moments)
    shapes = [(64, 96), (96, 64), (80, 80), (128,), (512, 64)]
    results = []
    for chunk in (1 << 26, 1000):  # everything at once, or one or two parameters per chunk
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s).to(device)) for s in shapes]
        opt = getattr(petra.optim, cls)(
            [{"params": ps[:3], "rank": 8, "update_proj_gap": 3}, {"params": ps[3:], "weight_decay": 0.1}], lr=1e-2
        )
        pieces = []
        monkeypatch.setattr(
            opt,
            "_update_piece",
            lambda ps_, *a, f=opt._update_piece, **kw: (pieces.append([tuple(p.shape) for p in ps_]), f(ps_, *a, **kw))[
                1
            ],
        )
        monkeypatch.setattr(opt, "chunk_elements", chunk)
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        results.append([p.detach().clone() for p in ps])
        if chunk == 1000:
            assert [(256, 64)] in pieces and [(512, 64)] not in pieces
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_adam_step_bound_is_what_exact_adam_reaches():
    from petra.optim.functional import adam_step_bound

    b1, b2 = 0.9, 0.999
    assert adam_step_bound(b1, b2, 1) == pytest.approx(1.0)
    # the worst case of Cauchy-Schwarz: gradients g_{t-k} proportional to (b1/b2)^k
    for t in (2, 10, 500):
        g = torch.tensor([(b1 / b2) ** (t - 1 - i) for i in range(t)], dtype=torch.float64)
        m = v = torch.zeros((), dtype=torch.float64)
        for x in g:
            m, v = b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * x * x
        ratio = (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt()
        assert float(ratio) == pytest.approx(adam_step_bound(b1, b2, t), rel=1e-9)
    assert adam_step_bound(0.99, 0.95, 10) == float("inf")


def _zipf_embedding_run(cls, steps=300, seed=0):
    """An embedding whose rows are used with Zipf frequencies (tokens of a corpus): rare rows
    get a gradient now and then and sit in 8-bit blocks with frequent ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(2048, 64))
    opt = cls([w], lr=1e-3)
    probs = 1.0 / torch.arange(1, 2049, dtype=torch.float64)
    for _ in range(steps):
        ids = torch.multinomial(probs, 256, replacement=True, generator=g)
        grad = torch.zeros(2048, 64)
        grad.index_add_(0, ids, torch.randn(256, 64, generator=g))
        w.grad = grad
        opt.step()
    return w.detach().abs().amax(1)


def test_8bit_embedding_rows_move_no_further_than_fp32_adam_could():
    """A rare row's second moment once rounded to 0 while its first moment did not, and the
    next step moved it by lr * m / eps: 12,707 against 4.7 in fp32 in the issue's test."""
    fp32 = _zipf_embedding_run(GaLoreAdamW)
    eight = _zipf_embedding_run(GaLoreAdamW8bit)
    from petra.optim.functional import adam_step_bound

    worst = 1e-3 * sum(adam_step_bound(0.9, 0.999, t) for t in range(1, 301))
    assert eight.max() <= worst  # the hard guarantee
    assert eight.max() <= 1.5 * fp32.max()  # and in practice: as far as fp32 moves
    assert torch.corrcoef(torch.stack([fp32, eight]))[0, 1] > 0.95


@pytest.mark.parametrize("method", ["galore8bit", "full8bit"])
def test_8bit_training_stays_within_a_small_margin_of_fp32(tmp_path, tiny_cfg, method):
    from petra.train import train

    quiet = dict(show_progress=False, log=lambda *a: None)
    ov = {"method.rank": 8, "train.steps": 40, "train.lr": 3e-3, "train.eval_every": 40}
    ref = train(tiny_cfg(**ov, **{"method.name": method.replace("8bit", "")}), tmp_path / "a", **quiet)
    q = train(tiny_cfg(**ov, **{"method.name": method}), tmp_path / "b", **quiet)
    # bitsandbytes' 8-bit GaLore ends 0.002 above fp32 at mini; 8-bit here is the same order
    assert abs(q["val_loss"] - ref["val_loss"]) < 0.02


def _refreshes(opt, weights, grads, monkeypatch):
    """{step: sorted indices of the matrices whose basis was recomputed at that step}."""
    seen: dict[int, list[int]] = {}
    real = type(opt)._refresh

    def spy(self, p, g, state, group, shards, ok=None):
        seen.setdefault(int(state["step"]), []).append(state["index"])  # the weights come first
        return real(self, p, g, state, group, shards, ok)

    monkeypatch.setattr(type(opt), "_refresh", spy)
    for gs in grads:
        for w, g in zip(weights, gs):
            w.grad = g.clone()
        opt.step()
    return {k: sorted(v) for k, v in seen.items()}


def _stagger_setup(n=8, gap=8, steps=24, stagger=True):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(12, 16)) for _ in range(n)]
    bias = torch.nn.Parameter(torch.randn(16))  # not low-rank: no place in the cycle
    grads = [[torch.randn(12, 16) for _ in range(n)] for _ in range(steps)]
    group = {"params": [*weights, bias], "rank": 3, "update_proj_gap": gap, "stagger_refresh": stagger}
    return weights, bias, grads, GaLoreAdamW([group], lr=0.01)


def test_staggered_refreshes_spread_over_the_gap(monkeypatch):
    weights, _, grads, opt = _stagger_setup()
    seen = _refreshes(opt, weights, grads, monkeypatch)
    assert seen[0] == list(range(8))  # every matrix needs its first basis at once
    for step in range(1, 24):  # then one matrix a step, each every 8 steps
        assert seen[step] == [step % 8]


def test_refreshes_all_at_once_without_staggering_as_galore_torch(monkeypatch):
    weights, _, grads, opt = _stagger_setup(stagger=False)
    assert _refreshes(opt, weights, grads, monkeypatch) == {s: list(range(8)) for s in (0, 8, 16)}


def test_staggered_refreshes_resume_on_the_same_steps(monkeypatch):
    weights, bias, grads, opt = _stagger_setup(n=5, gap=4, steps=14)
    cut = 7
    _refreshes(opt, weights, grads[:cut], monkeypatch)
    saved = copy.deepcopy(opt.state_dict())
    saved_w = [w.detach().clone() for w in (*weights, bias)]
    after = _refreshes(opt, weights, grads[cut:], monkeypatch)
    w2 = [torch.nn.Parameter(w) for w in saved_w]
    opt2 = GaLoreAdamW([{**opt.param_groups[0], "params": w2}], lr=0.01)
    opt2.load_state_dict(saved)
    assert _refreshes(opt2, w2[:5], grads[cut:], monkeypatch) == after
    assert all(torch.equal(a, b) for a, b in zip((*weights, bias), w2))


def test_a_state_saved_before_staggering_refreshes_on_multiples_of_the_gap(monkeypatch):
    weights, _, grads, opt = _stagger_setup(n=4, gap=4, steps=10)
    _refreshes(opt, weights, grads[:2], monkeypatch)
    for st in opt.state.values():
        st.pop("offset", None)  # as an earlier petra saved it
    assert _refreshes(opt, weights, grads[2:], monkeypatch) == {4: [0, 1, 2, 3], 8: [0, 1, 2, 3]}


# projected moments of (16, 512) and (512, 16) are 8-bit in GaLoreAdamW8bit, (128, 16) stays fp32
STACK_SHAPES = [(64, 512)] * 3 + [(512, 64)] * 2 + [(128, 128), (32,)]


def _stack_optimizer(cls, stacks, device, convention="torch", **group):
    """Matrices of STACK_SHAPES in a low-rank group (rank 16, refreshes staggered over a gap of
    3, `group`'s keys on top), the vector in a plain one; stacked updates on or off."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(device)) for s in STACK_SHAPES]
    low = {"params": ps[:6], "rank": 16, "update_proj_gap": 3, "stagger_refresh": True, **group}
    opt = cls([low, {"params": ps[6:]}], lr=1e-2, weight_decay=0.1, convention=convention)
    opt.stacks = stacks
    return ps, opt


def _stacked_run(
    cls, stacks, device, proj_type="std", convention="torch", steps=7, skip=(4,), per_stack=None, switch_state="keep"
):
    """An optimizer on matrices of a few shapes, one step skipped on the device (found_inf),
    refreshes staggered over a gap of 3 so that some fall between stacked updates."""
    ps, opt = _stack_optimizer(cls, stacks, device, convention, proj_type=proj_type, switch_state=switch_state)
    if per_stack:  # stacks of at most this many (64, 512) matrices
        opt.stack_elements = per_stack * 64 * 512
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step(found_inf=torch.tensor(float(step in skip), device=device))
    return ps, opt


def _record_stacked_pieces(cls, monkeypatch) -> list:
    """Whether each piece cls updates is a stack, in order."""
    pieces = []
    real = cls._update_piece
    monkeypatch.setattr(
        cls, "_update_piece", lambda self, ps, *a, **kw: (pieces.append(kw.get("stacked")), real(self, ps, *a, **kw))
    )
    return pieces


def _flat_state(opt) -> dict:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            for name, t in (("codes", v.codes), ("scale", v.scale)) if hasattr(v, "codes") else (("", v),):
                out[i, k, name] = t
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("proj_type,convention", [("std", "torch"), ("left", "galore-torch"), ("full", "torch")])
def test_matrices_of_one_shape_update_as_one_stack_with_the_numbers_of_one_at_a_time(
    proj_type, convention, cls, device, monkeypatch
):
    stacked_pieces = _record_stacked_pieces(cls, monkeypatch)
    one, opt1 = _stacked_run(cls, False, device, proj_type, convention)
    assert not any(stacked_pieces)
    stacked, opt2 = _stacked_run(cls, True, device, proj_type, convention)
    # 8-bit with a full projection: (16, 16) moments stay fp32, which never stack
    assert any(stacked_pieces) == (cls is GaLoreAdamW or proj_type != "full")
    s1, s2 = _flat_state(opt1), _flat_state(opt2)
    assert s1.keys() == s2.keys()
    assert all(float(s2[i, "step", ""]) == 6 for i in range(len(STACK_SHAPES)))  # 7 steps, one skipped
    split, _ = _stacked_run(cls, True, device, proj_type, convention, per_stack=2)
    if device == "cpu":  # the same bits, in stacks of 3 and 2 or of 2 and 1
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(one, stacked, split))
        assert all(torch.equal(s1[k], s2[k]) if torch.is_tensor(s1[k]) else s1[k] == s2[k] for k in s1)
    else:  # cuBLAS may round a batched product differently from single ones
        for a, b, c in zip(one, stacked, split):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize(
    "update,scale_type,proj_type",
    [
        ("apollo", "channel", "std"),
        ("apollo", "tensor", "left"),
        ("fira", "channel", "std"),
        ("fira", "channel", "left"),
    ],
)
def test_apollo_and_fira_update_in_stacks_with_the_numbers_of_one_at_a_time(
    cls, update, scale_type, proj_type, monkeypatch
):
    """APOLLO's channel (or tensor) scales and Fira's residual and norm-growth limiter, computed
    for a stack at once (each matrix's own scales and norms), give the bits of one at a time."""
    stacked_pieces = _record_stacked_pieces(cls, monkeypatch)

    def run(stacks):
        ps, opt = _stack_optimizer(
            cls, stacks, "cpu", proj_type=proj_type, update=update, scale_type=scale_type, norm_growth_limit=1.01
        )
        for step in range(7):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * (1 + step % 3)  # norms that grow: the limiter acts
            opt.step(found_inf=torch.tensor(float(step == 4)))
        return ps, _flat_state(opt)

    (one, s1), (stacked, s2) = run(False), run(True)
    assert any(stacked_pieces)
    assert all(torch.equal(a, b) for a, b in zip(one, stacked))
    assert s1.keys() == s2.keys() and any(k[1] == "update_norm" for k in s1)
    assert all(torch.equal(s1[k], s2[k]) if torch.is_tensor(s1[k]) else s1[k] == s2[k] for k in s1)


@pytest.mark.parametrize("stacks", [True, False])
def test_firas_back_projections_run_in_the_gradients_dtype(stacks):
    """In bf16 training Fira's two back-projections (the residual G - a P R and the update's
    a P D) are bf16 products added into the fp32 update, as the fira package computes them:
    an fp32 product of every matrix's size runs on a GPU without tensor cores, and was most
    of Fira's step beyond APOLLO's (docs/benchmarks.md, eleventh session)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = (aten.mm, aten.bmm, aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_, aten.matmul)
    products = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in kinds:
                products.append((out.dtype, tuple(out.shape[-2:])))
            return out

    torch.manual_seed(0)
    shapes = [(64, 512)] * 2 + [(512, 64)] * 2
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in shapes]
    opt = GaLoreAdamW([{"params": ps, "rank": 16, "update": "fira"}], lr=1e-2)
    opt.stacks = stacks
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=torch.bfloat16)
        if step < 2:
            opt.step()
            continue
        with Record():
            opt.step()
    whole = [dtype for dtype, shape in products if shape in set(shapes)]
    assert len(whole) >= 4 and set(whole) == {torch.bfloat16}, products


@pytest.mark.parametrize("switch_state", ["reset", "reproject"])
def test_refreshes_that_rewrite_moments_keep_stacks_exact(switch_state):
    """A refresh that resets (or rotates) a matrix's moments changes its moment step (or its
    moments) mid-cycle, staggered: such a matrix updates on its own that step, the others
    still as a stack, with the numbers of one at a time."""
    one, opt1 = _stacked_run(GaLoreAdamW, False, "cpu", switch_state=switch_state, steps=9)
    stacked, opt2 = _stacked_run(GaLoreAdamW, True, "cpu", switch_state=switch_state, steps=9)
    assert all(torch.equal(a, b) for a, b in zip(one, stacked))
    s1, s2 = _flat_state(opt1), _flat_state(opt2)
    assert all(torch.equal(s1[k], s2[k]) if torch.is_tensor(s1[k]) else s1[k] == s2[k] for k in s1)


@pytest.mark.parametrize(
    "extra", [{}, {"update": "apollo", "scale_type": "tensor"}, {"update": "fira"}], ids=["galore", "apollo", "fira"]
)
def test_host_work_of_a_stacked_step_does_not_grow_with_the_matrices(monkeypatch, extra):
    """The point of stacking: the operations dispatched per step (each a kernel launch on a
    GPU) are per shape, not per matrix. Views and reads of CPU step counts launch nothing."""

    def ops(k):
        ps = [torch.nn.Parameter(torch.randn(32, 64)) for _ in range(k)]
        opt = GaLoreAdamW([{"params": ps, "rank": 8, "update_proj_gap": 100, **extra}], lr=1e-2)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn(32, 64)
            if step < 2:
                opt.step(found_inf=torch.zeros(()))
        return dispatched(lambda: opt.step(found_inf=torch.zeros(())))

    assert ops(16) == ops(4)
    monkeypatch.setattr(GaLoreAdamW, "stacks", False)
    assert ops(16) >= ops(4) + 12 * 4  # one at a time: 5 per fp32 matrix here (bf16 adds casts)


@pytest.mark.parametrize("convention", ["torch", "galore-torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_update_as_one_stack_with_the_numbers_of_one_at_a_time(monkeypatch, convention, dtype):
    """The plain group's vectors alike (a model's RMSNorm weights) update as one stack, with
    weight decay and a step skipped on the device: the bits of one at a time (and of
    torch.optim.AdamW, convention torch), and host operations per shape, not per vector."""

    def run(stack_vectors, n=9, steps=6):
        monkeypatch.setattr(GaLoreAdamW, "stacks_vectors", stack_vectors)
        torch.manual_seed(0)
        low = [torch.nn.Parameter(torch.randn(32, 64, dtype=dtype)) for _ in range(2)]
        norms = [torch.nn.Parameter(1 + 0.1 * torch.randn(64, dtype=dtype)) for _ in range(n)]
        other = [torch.nn.Parameter(torch.randn(100, 64, dtype=dtype)), torch.nn.Parameter(torch.randn(7, dtype=dtype))]
        opt = GaLoreAdamW(
            [{"params": low, "rank": 8}, {"params": norms + other}], lr=1e-2, weight_decay=0.1, convention=convention
        )
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            for p in low + norms + other:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            found = torch.tensor(float(step == 3))
            ops = dispatched(lambda: opt.step(found_inf=found))
        return norms + other, _flat_state(opt), ops

    (one, s1, ops1), (stacked, s2, ops2) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(one, stacked))
    assert all(torch.equal(s1[k], s2[k]) if torch.is_tensor(s1[k]) else s1[k] == s2[k] for k in s1)
    assert run(True, n=17)[2] == ops2  # the same operations for 17 norms as for 9
    assert run(False, n=17)[2] >= ops1 + 8 * 2  # one at a time: at least 2 more per norm (5 in bf16)
    if convention == "torch" and dtype == torch.float32:
        torch.manual_seed(0)
        [torch.randn(32, 64) for _ in range(2)]
        ref = [torch.nn.Parameter(1 + 0.1 * torch.randn(64)) for _ in range(9)]
        ref += [torch.nn.Parameter(torch.randn(100, 64)), torch.nn.Parameter(torch.randn(7))]
        adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            [torch.randn(32, 64, generator=g) for _ in range(2)]
            for p in ref:
                p.grad = torch.randn(p.shape, generator=g)
            if step != 3:
                adamw.step()
        for a, b in zip(stacked, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _layerwise_stacked_run(cls, stacks, device, steps=6, skip=(4,)):
    """Layer-wise updates with clipping (finish() applies them) on matrices of a few shapes,
    one step's gradient not finite (skipped on the device), refreshes staggered over a gap of 3."""
    ps, opt = _stack_optimizer(cls, stacks, device)
    lw = LayerwiseStepper(opt, grad_clip=0.5)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        cs = [torch.randn(p.shape, generator=g).to(device) for p in ps]
        if step in skip:
            cs[1][0, 0] = float("nan")
        lw.armed = True
        sum((p * c).sum() for p, c in zip(ps, cs)).backward()
        lw.finish()
    return ps, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_layerwise_updates_stack_with_the_numbers_of_one_at_a_time(cls, device, monkeypatch):
    """finish() hands every clipped update to apply_updates at once: matrices alike update as
    one stack there too, from their projected gradients, with the clip coefficient and the
    device-side skip."""
    stacked_sizes = []
    real = cls._update_stack
    monkeypatch.setattr(
        cls, "_update_stack", lambda self, ps, *a, **kw: (stacked_sizes.append(len(ps)), real(self, ps, *a, **kw))
    )
    one, opt1 = _layerwise_stacked_run(cls, False, device)
    assert not stacked_sizes
    stacked, opt2 = _layerwise_stacked_run(cls, True, device)
    assert sorted(set(stacked_sizes)) == [2, 3]  # (64, 512) x 3 and (512, 64) x 2; (128, 128) alone
    s1, s2 = _flat_state(opt1), _flat_state(opt2)
    assert s1.keys() == s2.keys()
    assert all(float(s2[i, "step", ""]) == 5 for i in range(len(STACK_SHAPES)))  # 6 steps, one skipped
    if device == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(one, stacked))
        assert all(torch.equal(s1[k], s2[k]) if torch.is_tensor(s1[k]) else s1[k] == s2[k] for k in s1)
    else:
        for a, b in zip(one, stacked):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
