"""Trust in data, directories and inputs: nothing trained on that changed on disk, nothing of
the user's written over, bad values named before any work (issue 34), each fault injected."""

import json
import os
import shutil

import numpy as np
import pytest

from petra import checkpoint
from petra.cli import main
from petra.config import ConfigError
from petra.metrics import read_metrics
from petra.train import train

quiet = {"show_progress": False, "log": lambda *a: None}


def _text(path, n=400):
    path.write_text("\n\n".join(f"Paragraph {i} of a small corpus, about the number {i * 7}." for i in range(n)))
    return path


@pytest.fixture
def prepared(tmp_path):
    """A prepared directory (a 300-token BPE, one shard) and the flags of a tiny run on it."""
    src = _text(tmp_path / "notes.txt")
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(src), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.1"]) == 0
    return out


def _run_argv(out, data, *extra):
    return [
        "train",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "4",
        "--no-progress",
        "--set",
        "train.val_tokens=64",
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# -- 1. changed data is never trained on -------------------------------------------------


def test_a_changed_or_truncated_shard_of_a_prepared_directory_is_named_not_trained_on(tmp_path, prepared, capsys):
    shard = prepared / "shard-00000.train.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # half zeroed: valid ids
    assert main(_run_argv(tmp_path / "r", prepared)) == 2
    _one_line_error(capsys, "shard-00000.train.bin changed since it was prepared", "petra data prepare")
    assert not (tmp_path / "r").exists()
    shard.write_bytes(data[:-10])  # truncated
    assert main(_run_argv(tmp_path / "r", prepared)) == 2
    _one_line_error(capsys, "truncated or damaged")
    shard.write_bytes(data)  # restored: it trains (and the unchanged files are not hashed again)
    assert main(_run_argv(tmp_path / "r", prepared)) == 0


def test_an_unchanged_corpus_is_checked_by_size_and_stamp_only(prepared, monkeypatch):
    from petra import prepare as prep
    from petra.data import open_prepared

    m = json.loads((prepared / "manifest.json").read_text())
    calls = []
    monkeypatch.setattr(prep, "file_sha256", lambda p: calls.append(p) or "x")
    assert prep.verify(prepared, m) is None and calls == []  # prepare stamped what it wrote
    os.utime(prepared / "tokenizer.json")  # touched: hashed again (and found changed: the fake hash)
    assert "tokenizer.json changed" in prep.verify(prepared, m) and len(calls) == 1
    assert open_prepared  # the opener is data.prepare, tested above through the CLI


def test_a_swapped_tokenizer_in_a_prepared_directory_is_refused(tmp_path, prepared, capsys):
    tok = prepared / "tokenizer.json"
    d = json.loads(tok.read_text())
    d["added_tokens"][0]["content"] = "<|other|>"
    tok.write_text(json.dumps(d))
    assert main(_run_argv(tmp_path / "r", prepared)) == 2
    _one_line_error(capsys, "tokenizer.json changed since it was prepared")


def test_a_damaged_token_cache_is_prepared_again(tmp_path, tiny_overrides):
    from petra.config import build_config

    src = _text(tmp_path / "notes.txt")
    ov = {**tiny_overrides, "data.source": str(src), "data.cache_dir": str(tmp_path / "cache")}
    logs = []
    train(build_config(overrides=ov), tmp_path / "a", show_progress=False, log=logs.append)
    shard = next((tmp_path / "cache" / "tokens").glob("*/shard-00000.train.bin"))
    clean = shard.read_bytes()
    shard.write_bytes(bytes(len(clean)))
    logs.clear()
    train(build_config(overrides=ov), tmp_path / "b", show_progress=False, log=logs.append)
    assert any("the token cache is damaged" in line for line in logs) and shard.read_bytes() == clean
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]  # the same data


def test_a_run_refuses_a_swapped_copy_of_its_own_tokenizer(tmp_path, prepared, capsys):
    run = tmp_path / "r"
    assert main(_run_argv(run, prepared, "--stop-after", "2")) == 0
    other = tmp_path / "other"
    assert (
        main(["data", "prepare", str(_text(tmp_path / "b.txt", 50)), "--out", str(other), "--vocab-size", "290"]) == 0
    )
    shutil.copyfile(other / "tokenizer.json", run / "tokenizer.json")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    _one_line_error(capsys, f"{run / 'tokenizer.json'} is not the tokenizer this run trains with")
    assert main(["generate", str(run), "--prompt", "Paragraph"]) == 2
    _one_line_error(capsys, "is not the tokenizer", "trained with")


def test_a_swapped_tokenizer_file_is_named_before_any_tokenizing(tmp_path, tiny_overrides, monkeypatch):
    from petra import data as data_mod
    from petra.config import build_config
    from petra.tokenizer import train_tokenizer

    src = _text(tmp_path / "notes.txt")
    tok = tmp_path / "tok.json"
    train_tokenizer([src.read_text()], 300, tok)
    ov = {**tiny_overrides, "data.source": str(src), "data.tokenizer": str(tok), "train.stop_after": 2}
    train(build_config(overrides=ov), tmp_path / "r", **quiet)
    train_tokenizer([src.read_text()[:2000]], 280, tok)  # another tokenizer at the same path
    monkeypatch.setattr(data_mod, "prepare_corpus", lambda *a, **k: pytest.fail("re-tokenized"))
    with pytest.raises(ConfigError, match="is not the tokenizer this run trained with"):
        train(None, tmp_path / "r", resume=True, **quiet)


# -- 2. directories ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf-export", "own-config"])
def test_out_of_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tmp_path, prepared, capsys, kind):
    folder = tmp_path / "f"
    folder.mkdir()
    if kind == "hf-export":
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (folder / name).write_text('{"model_type": "llama"}')
    else:
        (folder / "config.json").write_text('{"mine": 1}')
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(_run_argv(folder, prepared)) == 2
    _one_line_error(capsys, f"--out {folder} is not empty and not a petra run", "config.json")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    argv = ["compare", "--preset", "tiny", "--methods", "full", "--steps", "2", "--out", str(folder)]
    assert main(argv) == 2
    _one_line_error(capsys, "is not empty and not a petra compare")
    assert main(["data", "build", "--out", str(folder), "--sources", "bible-kjv"]) == 2
    _one_line_error(capsys, "is not empty and not a petra data build")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_export_never_writes_into_a_folder_with_files(tmp_path, prepared, capsys):
    run = tmp_path / "r"
    assert main(_run_argv(run, prepared)) == 0
    target = tmp_path / "hf"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(target)]) == 2
    _one_line_error(capsys, "is not an empty directory; nothing was written there")
    assert [p.name for p in target.iterdir()] == ["notes.md"]


# -- 3. inputs -----------------------------------------------------------------------------


def test_globs_and_walks_do_not_follow_links_into_loops_and_a_file_twice_is_refused(tmp_path):
    from petra.sources import user_files

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    _text(d / "a.txt", 9)
    _text(d / "sub" / "b.txt", 9)
    os.symlink(".", d / "x")
    os.symlink(".", d / "y")  # two self-links: Python's recursive glob never ends
    os.symlink(tmp_path, d / "up")  # and one out of the folder and back into it
    want = [d / "a.txt", d / "sub" / "b.txt"]
    assert user_files(f"{d}/**/*.txt") == want and user_files(str(d)) == want
    with pytest.raises(ConfigError, match="names the file .*a.txt twice"):
        user_files(f"{d}/a.txt,{d}/*.txt")
    os.symlink(d / "a.txt", tmp_path / "link.txt")
    with pytest.raises(ConfigError, match="as .*a.txt and .*link.txt"):
        user_files(f"{d}/a.txt,{tmp_path}/link.txt")


def test_crlf_text_splits_into_paragraphs_like_lf(tmp_path):
    from petra.sources import text_file_documents

    body = "\n\n".join(f"paragraph {i} " + "x" * 1500 for i in range(6))
    (tmp_path / "lf.txt").write_text(body)
    (tmp_path / "crlf.txt").write_bytes(body.replace("\n", "\r\n").encode())
    lf = [d.text for d in text_file_documents(tmp_path / "lf.txt")]
    crlf = [d.text for d in text_file_documents(tmp_path / "crlf.txt")]
    assert len(lf) > 1 and crlf == lf


def test_a_huge_json_record_is_cut_like_paragraphs_and_stays_in_one_split(tmp_path):
    from petra.sources import _MAX_PARAGRAPH, jsonl_documents

    text = "\n".join("line %d " % i + "y" * 200 for i in range(15_000))  # 3.1M characters
    (tmp_path / "big.jsonl").write_text(json.dumps({"key": "k", "text": text}) + "\n")
    docs = list(jsonl_documents(tmp_path / "big.jsonl", "text"))
    assert len(docs) >= 3 and all(len(d.text) <= _MAX_PARAGRAPH for d in docs)
    assert {d.key for d in docs} == {"k"} and "".join(d.text for d in docs) == text


def test_data_build_decodes_the_windows_1252_punctuation_of_the_leeser_text(tmp_path):
    pytest.importorskip("pythonbible_leeser")
    from petra.sources import _CONTROL, bible_documents

    docs = list(bible_documents("leeser"))
    joined = "".join(d.text for d in docs)
    assert not _CONTROL.search(joined) and "\u2013" in joined and "\u2019" in joined
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--sources", "bible-leeser"]) == 0
    out = tmp_path / "p"
    assert main(["data", "prepare", str(tmp_path / "c"), "--out", str(out), "--vocab-size", "400"]) == 0


# -- 6. errors and exit codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--log-every", "0"], "train.log_every=0 must be at least 1"),
        (["--eval-every", "0"], "train.eval_every=0 must be at least 1"),
        (["--eval-every", "-2"], "train.eval_every=-2 must be at least 1"),
        (["--save-every", "-1"], "train.save_every=-1 must be at least 0"),
        (["--seq-len", "-5"], "train.seq_len=-5 must be at least 0"),
        (["--grad-clip", "-1"], "train.grad_clip=-1.0 must be at least 0"),
        (["--stop-after", "-2"], "train.stop_after=-2 must be at least 0"),
        (["--set", "train.seed=1e23"], "must be below 2**32 (4294967296)"),
        (["--set", "train.beta1=2"], "train.beta1=2.0 must be in [0, 1)"),
        (["--set", "train.eps=-1"], "train.eps=-1.0 must be positive"),
        (["--set", "model.max_position_embeddings=0"], "model.max_position_embeddings=0 must be at least 1"),
        (["--data", "bible,notes.txt"], "'bible' (the bundled corpus) cannot be combined"),
        (["--init-from", "/no/such/run"], "train.init_from='/no/such/run' is neither a petra run"),
    ],
)
def test_values_that_mean_nothing_are_named_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--out", str(out), *flags]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_path_and_sampling_errors_are_bad_input(tmp_path, prepared, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / ("x" * 300))]) == 2
    _one_line_error(capsys, "--out", "cannot create the directory", "too long")
    assert main(["export", str(tmp_path), "--hf", str(tmp_path / "hf")]) == 2
    _one_line_error(capsys, "is not a petra run directory")
    run = tmp_path / "r"
    assert main(_run_argv(run, prepared)) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "hi", "--samples", "0"]) == 2
    _one_line_error(capsys, "--samples 0 must be at least 1")
    assert main(["generate", str(run), "--prompt", "Paragraph " * 200]) == 2
    _one_line_error(capsys, "shorten --prompt", "context is 128 tokens")


def test_a_garbage_sentencepiece_model_is_named(tmp_path, capsys):
    bad = tmp_path / "tok.model"
    bad.write_bytes(os.urandom(300))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--tokenizer", str(bad)]) == 2
    _one_line_error(capsys, "is not a valid SentencePiece .model")


def test_ctrl_c_while_the_tokenizer_trains_exits_130_in_one_line(tmp_path, monkeypatch, capsys):
    import petra.prepare

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(petra.prepare, "train_tokenizer", interrupted)
    src = _text(tmp_path / "notes.txt")
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--data", str(src), "--no-progress"]
    assert main([*argv, "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 130
    _one_line_error(capsys, "interrupted (Ctrl-C)")


def test_resume_survives_a_damaged_config_and_a_half_written_metrics_line(tmp_path, prepared, capsys):
    run = tmp_path / "r"
    assert main(_run_argv(run, prepared, "--stop-after", "2")) == 0
    (run / "config.json").write_text('{"preset": "tiny", "model": ')  # cut short by hand
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 4.')  # a kill mid-line
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "the config its checkpoint holds is used" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["preset"] == "tiny"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [2, 4]  # the cut line gone


def test_a_checkpoint_copied_from_another_run_is_refused(tmp_path, prepared, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_run_argv(a, prepared, "--stop-after", "2")) == 0
    assert main(_run_argv(b, prepared, "--stop-after", "2", "--preset", "mini")) == 0
    shutil.copyfile(b / "checkpoint.pt", a / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(a), "--no-progress"]) == 2
    _one_line_error(capsys, "was not saved by the run its config.json describes", "preset: 'tiny' -> 'mini'")


def test_a_checkpoint_that_does_not_fit_its_config_is_not_exported(tmp_path, prepared, capsys):
    import torch

    run = tmp_path / "r"
    assert main(_run_argv(run, prepared)) == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    payload["model"]["lm_head.weight"] = payload["model"]["lm_head.weight"][:10]
    torch.save(payload, run / "checkpoint.pt")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    _one_line_error(capsys, "does not fit its own config: lm_head.weight", "nothing was exported")
    assert not (tmp_path / "hf").exists()


# -- 6. runs that fail, and the last good checkpoint ------------------------------------------


def test_a_run_that_collapses_before_its_patience_ends_is_a_failure(tmp_path, tiny_cfg, monkeypatch):
    from petra.health import Health
    from petra.train import TrainingError

    real = Health.check

    def collapsing(self, step, loss, grad_norm):  # from step 3 on the gradient norm is exactly 0
        return real(self, step, loss, 0.0 if step >= 3 else grad_norm)

    monkeypatch.setattr(Health, "check", collapsing)
    with pytest.raises(TrainingError, match="gradient norm is exactly 0 \\(collapsed\\): it failed"):
        train(tiny_cfg(**{"train.steps": 6, "train.save_every": 2}), tmp_path / "r", **quiet)  # patience 50
    assert checkpoint.load(tmp_path / "r")["step"] == 2  # the last good one: written in range


def test_a_blow_up_keeps_the_last_checkpoint_written_in_range(tmp_path, tiny_cfg, monkeypatch):
    from petra.health import Health

    real = Health.check

    def blowing_up(self, step, loss, grad_norm):  # from step 16 the gradient norm explodes
        return real(self, step, loss, grad_norm * (1e6 if step >= 16 else 1.0))

    monkeypatch.setattr(Health, "check", blowing_up)
    logs = []
    cfg = tiny_cfg(**{"train.steps": 20, "train.save_every": 5, "train.stop_after": 18})
    train(cfg, tmp_path / "r", show_progress=False, log=logs.append)
    assert checkpoint.load(tmp_path / "r")["step"] == 15
    assert any("no checkpoint written: the gradient norm" in line and "(step 15) is intact" in line for line in logs)


def test_resuming_a_finished_run_changes_nothing(tmp_path, prepared, capsys):
    run = tmp_path / "r"
    assert main(_run_argv(run, prepared)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "finished its 4 steps earlier: nothing to train, nothing changed" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".petra.lock"} == {
        k: v for k, v in before.items() if k != ".petra.lock"
    }
    assert json.loads((run / "summary.json").read_text())["val_loss"] is not None


def test_the_verified_stamp_is_no_structure_the_size_of_the_corpus(prepared):
    stamps = json.loads((prepared / ".petra-verified.json").read_text())
    assert set(stamps) == {"tokenizer.json", "shard-00000.train.bin", "shard-00000.val.bin"}
    assert np.dtype(json.loads((prepared / "manifest.json").read_text())["dtype"]).itemsize == 2
