"""What a practitioner reaches for in the first hour (issue 37): eval, starting from a Hugging
Face Llama, samples while training, kept checkpoints, the full config, a report of runs
trained before, and help and output that say what they do and where things went."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from petra.cli import main
from petra.metrics import read_metrics

TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--set", "train.val_tokens=256"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("fh") / "run"
    argv = ["train", *TINY, "--steps", "6", "--set", f"data.cache_dir={cache_dir}", "--out", str(out)]
    assert main(argv) == 0
    return out


def _hf_llama(tmp_path, tokenizer: str, **extra):
    """A small transformers LlamaForCausalLM saved in 3 safetensors shards, with a tokenizer."""
    transformers = pytest.importorskip("transformers")
    from petra.tokenizer import Tokenizer

    vocab = Tokenizer(__import__("pathlib").Path(tokenizer)).vocab_size
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "hf-llama"
    model.save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer.json").write_bytes(open(tokenizer, "rb").read())
    return model, out


def test_eval_gives_the_validation_loss_of_a_run_and_of_its_export(run, tmp_path, capsys, cache_dir):
    common = ["--data", "bible", "--tokens", "2048", "--batch-size", "4"]
    assert main(["eval", str(run), *common, "--json", str(tmp_path / "a.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "tokens in windows of 128" in line and "perplexity" in line
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert main(["eval", str(tmp_path / "hf"), *common, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["tokens"] == b["tokens"] == 2048 and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # the same number petra's own evaluation gives on those windows
    from petra.config import DataConfig
    from petra.data import prepare, val_batches
    from petra.generate import load
    from petra.validation import evaluate

    model, tok = load(run, torch.device("cpu"), torch.float32)
    td = prepare(DataConfig(source="bible", tokenizer=str(tok.path)), model.config.vocab_size, log=lambda *x: None)
    assert evaluate(model, val_batches(td.train, 128, 4, 2048), "cpu")[0] == pytest.approx(a["loss"], abs=1e-6)


def test_eval_hands_tasks_to_lm_eval_harness_and_names_it_when_missing(run, monkeypatch, capsys):
    assert main(["eval", str(run), "--lm-eval", "hellaswag"]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err
    calls = []
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kw: calls.append(kw) or {"results": {"hellaswag": {"acc": 0.25}}}
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    assert main(["eval", str(run), "--lm-eval", "hellaswag,arc_easy", "--limit", "10"]) == 0
    (kw,) = calls
    assert kw["model"] == "hf" and kw["tasks"] == ["hellaswag", "arc_easy"] and kw["limit"] == 10
    assert kw["model_args"].startswith("pretrained=") and '"acc": 0.25' in capsys.readouterr().out


def test_a_run_starts_from_a_sharded_hugging_face_llama_with_its_architecture_and_tokenizer(run, tmp_path):
    from petra import checkpoint, hf
    from petra.config import ModelConfig
    from petra.model import LlamaForCausalLM

    ref, path = _hf_llama(tmp_path, str(run / "tokenizer.json"))
    assert len(list(path.glob("model-*.safetensors"))) >= 2  # sharded, with an index
    ours = LlamaForCausalLM(ModelConfig(**hf.model_fields(path)))
    checkpoint.load_initial(ours, hf.weights(path), str(path))
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x).logits, atol=1e-5)
    out = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "2", "--init-from", str(path), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"]["hidden_size"], saved["model"]["num_hidden_layers"]) == (64, 2)
    assert saved["data"]["tokenizer"] == str(path / "tokenizer.json")


def test_what_petras_llama_cannot_hold_is_refused_by_name(run, tmp_path, capsys):
    _, path = _hf_llama(tmp_path, str(run / "tokenizer.json"), num_key_value_heads=2)
    assert main(["train", *TINY, "--steps", "2", "--init-from", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "grouped-query attention (2 key/value heads for 4)" in capsys.readouterr().err


def test_a_start_from_weights_of_another_tokenizer_is_refused(run, tmp_path, capsys):
    notes = tmp_path / "n.txt"
    notes.write_text("\n\n".join(f"note {i} about a subject" for i in range(300)))
    argv = ["train", *TINY, "--steps", "2", "--data", str(notes), "--init-from", str(run), "--out", str(tmp_path / "r")]
    assert main([*argv, "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "model.vocab_size=2048"]) == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err


def test_samples_while_training_and_kept_checkpoints(tmp_path, capsys, cache_dir):
    out = tmp_path / "r"
    argv = [
        "train",
        *TINY,
        "--steps",
        "8",
        "--save-every",
        "2",
        "--out",
        str(out),
        "--set",
        f"data.cache_dir={cache_dir}",
    ]
    argv += [
        "--set",
        "train.sample_every=4",
        "--set",
        "train.keep_checkpoints=3",
        "--set",
        "train.sample_prompt=And God",
    ]
    assert main(argv) == 0
    samples = [r for r in read_metrics(out / "metrics.jsonl") if "sample" in r]
    assert [r["step"] for r in samples] == [4, 8] and all(r["sample"].startswith("And God") for r in samples)
    assert "step 4: sample: 'And God" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint-step0000004.pt",
        "checkpoint-step0000006.pt",
        "checkpoint.pt",
    ]
    from petra import checkpoint

    assert checkpoint.load(out)["step"] == 8
    assert torch.load(out / "checkpoint-step0000006.pt", weights_only=False)["step"] == 6


def test_config_prints_every_field_as_yaml_that_config_reads_back(tmp_path, capsys):
    import yaml

    from petra.config import build_config

    assert main(["config", "--preset", "60m", "--method", "galore", "--lr", "0.004"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    d = yaml.safe_load(text)
    assert d["preset"] == "60m" and d["train"]["lr"] == 0.004 and "keep_checkpoints" in d["train"]
    again = build_config(file=tmp_path / "c.yaml")
    assert (
        again.to_dict()
        == build_config(overrides={"preset": "60m", "method.name": "galore", "train.lr": 0.004}).to_dict()
    )


def test_compare_reports_runs_trained_before_without_training(run, tmp_path, capsys, monkeypatch):
    import petra.train as tr

    monkeypatch.setattr(tr, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "rep"
    assert main(["compare", "--runs", f"{run},{run}", "--out", str(out)]) == 2
    assert "names a run directory twice" in capsys.readouterr().err
    other = tmp_path / "galore-run"
    monkeypatch.undo()
    argv = ["train", *TINY, "--steps", "6", "--method", "galore", "--out", str(other)]
    assert main([*argv, "--set", f"data.cache_dir={run.parent / 'none'}"]) == 0
    assert main(["compare", "--runs", f"{run},{other}", "--out", str(out)]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["full", "galore"] and (out / "report.html").is_file()
    assert "Final ranking" in (out / "comparison.md").read_text()


def test_help_says_what_each_command_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for word in ("APOLLO-Mini", "Fira", "Muon", "Adam-mini", "examples:", "petra eval"):
        assert word in top
    for cmd, absent in (("compare", "--stop-after"), ("plan", "--init-from"), ("plan", "--log-to")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert absent not in capsys.readouterr().out
    for cmd in ("estimate", "export", "eval", "config"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert len(out) > 400 and "exit codes: 0 finished" not in out
    assert main(["estimate", "--preset", "1b", "--rank", "512", "--method", "apollo,apollo-mini"]) == 0
    lines = [ln.split("|") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| apollo")]
    rows = {cells[1].strip(): cells[2].strip() for cells in lines}
    assert rows == {"apollo": "512", "apollo-mini": "1"}


def test_commands_that_train_nothing_do_not_import_torch():
    code = (
        "import sys; from petra.cli import main; main(['presets']); main(['estimate']); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout[-500:] + r.stderr[-500:]


def test_an_export_loads_without_warnings_and_with_ordinary_file_modes(run, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert "max_length" not in json.loads((tmp_path / "hf" / "generation_config.json").read_text())


def test_a_run_prints_no_library_noise_and_says_where_it_went(tmp_path, cache_dir):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "petra", "train", *TINY[:-3], "--steps", "20", "--stop-after", "2"]
    cmd += ["--method", "galore8bit", "--set", f"data.cache_dir={cache_dir}", "--set", "train.val_tokens=256"]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Failed to load" not in r.stderr and "KernelPreference" not in r.stderr
    assert "2/20" in r.stderr  # the bar counts the schedule, not the stop
    assert f"stopped at step 2 (checkpoint saved); continue with: petra train --resume {out}" in r.stdout
