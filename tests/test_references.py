"""petra against the reference packages themselves, on CPU: galore-torch (GaLoreAdamW,
GaLoreAdafactor), peft (LoRA merge) and transformers (the exported model and tokenizer).
Same initial weights, same gradients: the same trajectory."""

import copy

import pytest
import torch

from petra.optim import GaLoreAdafactor, GaLoreAdamW

galore_torch = pytest.importorskip("galore_torch")

SHAPES = [(24, 40), (40, 24), (32, 32)]  # left, right, and a square matrix (right, as galore-torch)


def _trajectories(make_ours, make_ref, shapes, steps, seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    refs = copy.deepcopy(ours)
    a, b = make_ours(ours), make_ref(refs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p, q in zip(ours, refs):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    return ours, refs


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_galore_adamw_follows_galore_torch_before_the_second_refresh(wd):
    """convention='galore-torch', eps=1e-6: eps before the bias correction, decay after the
    update. The bases' signs differ (petra aligns them) and change nothing until a second
    refresh; both compute the basis by an fp32 SVD (of G or of G^T), which differ by ~1e-6:
    the weights, which move by ~0.05 here, agree to 1e-6."""
    low = dict(rank=6, update_proj_gap=50, scale=0.25, proj_type="std")
    ours, refs = _trajectories(
        lambda ps: GaLoreAdamW(
            [{"params": ps, **low, "projector": "svd"}], lr=1e-2, eps=1e-6, weight_decay=wd, convention="galore-torch"
        ),
        lambda ps: galore_torch.GaLoreAdamW([{"params": ps, **low}], lr=1e-2, eps=1e-6, weight_decay=wd),
        SHAPES,
        steps=20,
    )
    for p, q in zip(ours, refs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_the_default_torch_convention_differs_from_galore_torch_by_eps_placement():
    low = dict(rank=6, update_proj_gap=50, scale=0.25, proj_type="std")
    runs = {}
    for conv in ("torch", "galore-torch"):
        runs[conv] = _trajectories(
            lambda ps: GaLoreAdamW([{"params": ps, **low, "projector": "svd"}], lr=1e-2, eps=1e-3, convention=conv),
            lambda ps: galore_torch.GaLoreAdamW([{"params": ps, **low}], lr=1e-2, eps=1e-3),
            SHAPES,
            steps=20,
        )
    diff = {c: max(float((p - q).abs().max()) for p, q in zip(*r)) for c, r in runs.items()}
    assert diff["galore-torch"] < 1e-6 and diff["torch"] > 100 * diff["galore-torch"]


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_follows_galore_torch(beta1):
    """At a constant lr both momentum conventions agree (see GaLoreAdafactor's docstring)."""
    low = dict(rank=6, update_proj_gap=50, scale=0.25, proj_type="std")
    shapes = SHAPES + [(17,)]
    ours, refs = _trajectories(
        lambda ps: GaLoreAdafactor(
            [{"params": ps[:3], **low, "projector": "svd"}, {"params": ps[3:]}], lr=1e-2, beta1=beta1, weight_decay=0.01
        ),
        lambda ps: galore_torch.GaLoreAdafactor(
            [{"params": ps[:3], **low}, {"params": ps[3:]}],
            lr=1e-2,
            beta1=beta1,
            weight_decay=0.01,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        ),
        shapes,
        steps=15,
    )
    for p, q in zip(ours, refs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=None), "needs a learning rate lr >= 0"),
        (dict(relative_step=True), "does not implement relative_step=True"),
        (dict(scale_parameter=True), "does not implement scale_parameter=True"),
        (dict(warmup_init=True), "does not implement warmup_init=True"),
        (dict(beta1=1.5), "beta1=1.5 must be None"),
        (dict(decay_rate=0.8), "decay_rate=0.8 (must be < 0)"),
    ],
)
def test_galore_adafactor_rejects_what_it_does_not_do_by_name(kwargs, message):
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError) as e:
        GaLoreAdafactor([p], **kwargs)
    assert message in str(e.value)
    # transformers' call with the options off works
    GaLoreAdafactor([p], lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)


def test_relora_layers_and_merge_match_peft():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from petra import checkpoint
    from petra.config import PRESETS, ModelConfig
    from petra.lora import lora_modules, merged_state_dict, wrap
    from petra.model import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS["tiny"])
    ours = LlamaForCausalLM(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**checkpoint.hf_config(vars(cfg), None)))
    hf.load_state_dict(ours.state_dict(), strict=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrap(ours, r"(self_attn|mlp)\.\w+_proj", 8, 16.0)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16.0, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for m in lora_modules(ours):
            m.lora_B.normal_(std=0.05)
        for name, m in ours.named_modules():
            if name.endswith(tuple(targets)):
                ref = hf.get_submodule("base_model.model." + name)
                ref.lora_A["default"].weight.copy_(m.lora_A)
                ref.lora_B["default"].weight.copy_(m.lora_B)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
        merged = hf.merge_and_unload().state_dict()
    plain = merged_state_dict(ours.state_dict(), 16.0 / 8)
    for k, v in plain.items():
        torch.testing.assert_close(v, merged[k], rtol=1e-6, atol=1e-6)


def _export(tmp_path, tiny_cfg, **ov):
    from petra import checkpoint
    from petra.train import train

    run = tmp_path / "run"
    train(tiny_cfg(**{"train.steps": 4, **ov}), run, show_progress=False, log=lambda *a: None)
    return run, checkpoint.export_hf(run, tmp_path / "hf")


def test_export_loads_with_autotokenizer_and_generates_from_a_padded_batch(tmp_path, tiny_cfg, monkeypatch):
    transformers = pytest.importorskip("transformers")
    run, hf = _export(tmp_path, tiny_cfg)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (hf / name).is_file()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.model_max_length == 64 * 2
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    gen = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = gen(["In the beginning", "And the LORD said unto Moses, Go"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert all(o[0]["generated_text"].startswith(p) for o, p in zip(out, ["In the beginning", "And the LORD"]))
    batch = tok(["In the beginning", "And the LORD said unto Moses"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and tok.padding_side == "left"


def test_the_run_keeps_its_tokenizer_so_export_never_needs_the_cache(tmp_path, tiny_cfg, cache_dir):
    import shutil

    from petra import checkpoint

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    run = tmp_path / "run"
    from petra.train import train

    train(tiny_cfg(**{"train.steps": 2, "data.cache_dir": str(cache)}), run, show_progress=False, log=lambda *a: None)
    shutil.rmtree(cache)  # the cache moved away
    assert (run / "tokenizer.json").is_file()
    checkpoint.export_hf(run, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    (run / "tokenizer.json").unlink()  # gone from the run too: the export says so
    warned = []
    checkpoint.export_hf(run, tmp_path / "hf2", warn=warned.append)
    assert "the export has no tokenizer" in warned[0] and not (tmp_path / "hf2" / "tokenizer.json").exists()


def test_a_sentencepiece_tokenizer_is_exported_for_transformers(tmp_path, tiny_cfg):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    from petra.sources import bible_documents

    text = tmp_path / "train.txt"
    text.write_text("\n".join(d.text for d in list(bible_documents("kjv"))[:100]))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=500, model_type="bpe", minloglevel=2
    )
    run, hf = _export(tmp_path, tiny_cfg, **{"data.tokenizer": str(tmp_path / "sp.model")})
    assert (run / "tokenizer.model").is_file() and (hf / "tokenizer.model").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.eos_token == sp.id_to_piece(sp.eos_id())
    assert tok("In the beginning God")["input_ids"] == sp.encode("In the beginning God")
