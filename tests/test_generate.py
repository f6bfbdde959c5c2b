"""petra generate: the KV cache changes nothing, greedy decoding equals transformers' generate
on the export, sampling is seeded and restricted as asked, and bad requests fail first."""

import pytest
import torch

from petra.cli import main
from petra.config import ConfigError
from petra.generate import generate, load, sample
from petra.train import train

quiet = dict(show_progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_overrides):
    from petra.config import build_config

    out = tmp_path_factory.mktemp("gen") / "run"
    train(build_config(overrides={**tiny_overrides, "train.steps": 20, "train.lr": 3e-3}), out, **quiet)
    return out


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_kv_cache_gives_the_tokens_of_a_full_recompute(run):
    model, tok = load(run, torch.device("cpu"), torch.float32)
    prompt = tok.encode_documents(["In the beginning God"])[0][:-1].tolist()
    assert generate(model, prompt, 24) == _greedy_without_cache(model, prompt, 24)


def test_greedy_decoding_equals_transformers_generate_on_the_export(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, tok = load(tmp_path / "hf", torch.device("cpu"), torch.float32)
    prompt = tok.encode_documents(["And the LORD said unto Moses"])[0][:-1].tolist()
    ours = generate(model, prompt, 20)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, len(prompt) :].tolist()
    assert ours == generate(load(run, torch.device("cpu"), torch.float32)[0], prompt, 20)  # run dir = export


def test_sampling_is_seeded_and_top_k_1_is_greedy(run):
    model, tok = load(run, torch.device("cpu"), torch.float32)
    prompt = tok.encode_documents(["the"])[0][:-1].tolist()
    a = generate(model, prompt, 16, temperature=1.0, seed=3)
    assert a == generate(model, prompt, 16, temperature=1.0, seed=3)
    assert a != generate(model, prompt, 16, temperature=1.0, seed=4)
    assert generate(model, prompt, 16, temperature=1.0, top_k=1) == generate(model, prompt, 16)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)
    # top-p 0.7: the mass before the third token is 0.8, so only the first two remain
    draws = torch.stack([sample(logits, 1.0, 0, 0.7, gen) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean() == pytest.approx(0.5 / 0.8, abs=0.03)
    draws = torch.stack([sample(logits, 1.0, 3, 1.0, gen) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {0, 1, 2}  # top-k 3
    assert int(sample(logits, 0.0, 0, 1.0, None)) == 0


def test_bad_requests_fail_before_any_work(run, tmp_path, capsys):
    model, _ = load(run, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="exceed the model's context of 128 tokens"):
        generate(model, [1] * 100, 29)
    with pytest.raises(ConfigError, match="neither a petra run directory"):
        load(tmp_path, torch.device("cpu"), torch.float32)
    assert main(["generate", str(run), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature -1.0 must be >= 0" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("In the")
