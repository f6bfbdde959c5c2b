import json

import numpy as np
import pytest

from petra.config import ConfigError, DataConfig
from petra.data import Batches, prepare, val_batches
from petra.sources import bible_documents, documents, split_of


def test_bible_split_is_by_chapter_across_translations():
    kjv = {d.key: d.text for d in bible_documents("kjv")}
    asv = {d.key: d.text for d in bible_documents("asv")}
    assert len(kjv) == 1189 and kjv.keys() == asv.keys()
    assert "In the beginning God created" in kjv["bible:1001"]
    assert not any(ch.isdigit() for ch in kjv["bible:1001"][:40])  # verse numbers removed
    val = [k for k in kjv if split_of(k, 0.05) == "val"]
    assert 0.03 < len(val) / len(kjv) < 0.07


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_001, dtype=np.uint16)
    a = Batches(tokens, seq_len=10, batch_size=7, seed=3)
    b = Batches(tokens, seq_len=10, batch_size=7, seed=3)
    x1, y1 = a.get(5)
    for s in (9, 2, 5):  # a different history must not change what step 5 draws
        b.get(s)
    x2, y2 = b.get(5)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()
    assert not (Batches(tokens, 10, 7, seed=4).get(5)[0] == x1).all()
    # one pass visits every window exactly once
    seen = [w for s in range(a.windows // 7) for w in a.sample_ids(s)]
    assert len(set(seen)) == len(seen)
    # micro-batch slices partition the step's samples
    xa, _ = a.get(5, slice(0, 3))
    xb, _ = a.get(5, slice(3, 7))
    assert (np.concatenate([xa, xb]) == x1.numpy()).all()


def test_user_text_and_jsonl_files(tmp_path, cache_dir):
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i} about stones and rivers." * 20 for i in range(300)))
    with (tmp_path / "b.jsonl").open("w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"record {i} " * 50}) + "\n")
    cfg = DataConfig(source=str(tmp_path), cache_dir=cache_dir, val_fraction=0.1)
    docs = list(documents(cfg))
    assert len(docs) > 200
    data = prepare(cfg, vocab_size=300, log=lambda *_: None)
    assert data.vocab_size == 300 and len(data.train) > len(data.val) > 0
    again = prepare(cfg, vocab_size=300, log=lambda *_: None)
    assert again.fingerprint == data.fingerprint  # cached by content
    text = data.tokenizer.decode([int(t) for t in data.train[:30]])
    assert "stones" in text or "record" in text


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "does not exist"),
        ("empty_dir", "holds no .txt/.*/.parquet files"),
        ("empty_text", "holds no text"),
        ("blank_records", "holds no text"),
        ("bad_json", "is not valid JSON"),
        ("no_field", "has no string field 'text'"),
        ("csv", "must end in one of .txt, .*, .parquet"),
    ],
)
def test_bad_data_sources(tmp_path, cache_dir, setup, message):
    src = tmp_path / "data"
    if setup == "empty_dir":
        src.mkdir()
    elif setup == "empty_text":
        src = tmp_path / "e.txt"
        src.write_text("   \n\n ")
    elif setup == "blank_records":
        src = tmp_path / "b.jsonl"
        src.write_text('{"text": "  "}\n{"text": "\\n\\t"}\n')
    elif setup == "bad_json":
        src = tmp_path / "x.jsonl"
        src.write_text('{"text": "ok"}\n{broken\n')
    elif setup == "no_field":
        src = tmp_path / "x.jsonl"
        src.write_text('{"content": "ok"}\n')
    elif setup == "csv":
        src = tmp_path / "x.csv"
        src.write_text("a,b\n")
    with pytest.raises(ConfigError, match=message):
        prepare(DataConfig(source=str(src), cache_dir=cache_dir), 256)


def test_validation_batches_fixed_and_error_when_too_short():
    tokens = np.arange(1000, dtype=np.uint16)
    v1 = val_batches(tokens, 10, 4, 120)  # 120 tokens: 12 windows of 10, 3 batches of 4
    v2 = val_batches(tokens, 10, 4, 120)
    assert len(v1) == 3 and all((a[0] == b[0]).all() for a, b in zip(v1, v2))
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        val_batches(tokens[:5], 10, 4, 120)


def test_sentencepiece_tokenizer_is_used_and_model_vocab_follows(tmp_path, cache_dir):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(d.text for d in list(bible_documents("kjv"))[:200]))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=500, model_type="bpe", minloglevel=2
    )
    cfg = DataConfig(source="bible", tokenizer=str(tmp_path / "sp.model"), cache_dir=cache_dir)
    data = prepare(cfg, vocab_size=256, log=lambda *_: None)
    assert data.vocab_size == 500
    assert "beginning" in data.tokenizer.decode([int(t) for t in data.train[:20]])
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(DataConfig(source="bible", tokenizer=str(tmp_path / "none.model"), cache_dir=cache_dir), 256)


def test_text_that_is_not_utf8_is_an_error_naming_file_and_byte_unless_its_encoding_is_set(tmp_path, cache_dir):
    f = tmp_path / "notes.txt"
    body = "\n\n".join(f"Le café numéro {i} est très bon, dit-il." * 12 for i in range(400))
    f.write_bytes(body.encode("latin-1"))
    offset = body.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"notes.txt is not valid utf-8: byte {offset} \(0xe9\).*data.encoding"):
        prepare(DataConfig(source=str(f), cache_dir=cache_dir), 300)
    data = prepare(DataConfig(source=str(f), cache_dir=cache_dir, encoding="latin-1"), 300, log=lambda *_: None)
    text = data.tokenizer.decode([int(t) for t in data.train[:200]])
    assert "café" in text and "\ufffd" not in text
    with pytest.raises(ConfigError, match="data.encoding='latin-9x' is not a text encoding"):
        from petra.config import build_config

        build_config(overrides={"data.encoding": "latin-9x"})


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_binary_files_are_refused(tmp_path, cache_dir, encoding):
    f = tmp_path / "blob.txt"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match=r"blob.txt is not text: it holds a NUL byte at byte \d+"):
        prepare(DataConfig(source=str(f), cache_dir=cache_dir, encoding=encoding), 300)
    no_nul = bytes(b if b else 1 for b in f.read_bytes())  # control characters, no NUL
    f.write_bytes(no_nul)
    with pytest.raises(ConfigError, match="is not (text|valid utf-8)"):
        prepare(DataConfig(source=str(f), cache_dir=cache_dir, encoding=encoding), 300)


def test_a_single_small_notes_file_trains_on_a_token_tail_split(tmp_path, cache_dir):
    f = tmp_path / "notes.txt"  # about 35 KB in 7 documents: too few to split by document
    f.write_text(
        "\n\n".join(f"Meeting {i}: we planned the garden, the roof and the {i}th budget line. " * 60 for i in range(7))
    )
    logs = []
    for frac in (0.05, 0.2, 0.45):
        cfg = DataConfig(source=str(f), cache_dir=cache_dir, val_fraction=frac)
        assert len(list(documents(cfg))) <= 7
        data = prepare(cfg, 300, log=logs.append)
        total = len(data.train) + len(data.val)
        assert len(data.val) > 0 and len(data.train) > 0
        if frac == 0.05:  # no document lands in validation: the tail of the tokens does
            assert len(data.val) == round(frac * total)
    assert any("too few to split by document" in line for line in logs)
    from petra.config import build_config
    from petra.train import train

    cfg = build_config(
        overrides={
            "preset": "tiny",
            "data.source": str(f),
            "data.cache_dir": cache_dir,
            "train.steps": 3,
            "train.batch_size": 2,
            "train.seq_len": 32,
            "train.val_tokens": 64,
            "model.vocab_size": 300,
        }
    )
    assert train(cfg, tmp_path / "run", show_progress=False, log=lambda *a: None)["status"] == "finished"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_the_feistel_order_is_a_permutation_of_every_size(n):
    from petra.data import feistel

    out = feistel(np.arange(n), n, key=12345)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:  # shuffled, and another key gives another order
        assert (out != np.arange(n)).mean() > 0.9
        assert (feistel(np.arange(n), n, key=12346) != out).mean() > 0.9


def test_the_batch_order_needs_no_table_and_differs_per_pass_and_seed():
    tokens = np.zeros(64 * 1000 + 1, dtype=np.uint16)
    b = Batches(tokens, seq_len=64, batch_size=10, seed=1)
    first = [w for s in range(100) for w in b.sample_ids(s)]  # pass 0
    second = [w for s in range(100, 200) for w in b.sample_ids(s)]  # pass 1
    assert sorted(first) == sorted(second) == list(range(1000)) and first != second
    assert first != [w for s in range(100) for w in Batches(tokens, 64, 10, seed=2).sample_ids(s)]
    assert b._perm is None  # nothing stored: a 13B-token corpus costs what this one does
    big = Batches(np.zeros(3, np.uint16), 1, 4, seed=0)
    big.windows = 51_000_000_000 // 256  # 13B tokens of 256-token windows, 5.1e7 of them
    ids = big.sample_ids(123_456_789)
    assert len(set(ids)) == 4 and all(0 <= i < big.windows for i in ids)


def test_runs_saved_before_the_feistel_order_resume_with_their_randperm_order():
    import torch

    from petra.config import build_config, from_dict

    saved = build_config(overrides={"preset": "tiny"}).to_dict()
    del saved["data"]["shuffle"]
    cfg = from_dict(saved)
    assert cfg.data.shuffle == "randperm"
    tokens = np.zeros(10 * 50 + 1, dtype=np.uint16)
    b = Batches(tokens, 10, 7, seed=3, order=cfg.data.shuffle)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + 0)).tolist()
    assert b.sample_ids(2) == perm[14:21]  # exactly what the old code drew at step 2


def test_configs_saved_with_eval_batches_and_jsonl_field_load_with_the_same_meaning():
    from petra.config import build_config, from_dict

    saved = build_config(overrides={"preset": "tiny", "train.batch_size": 8, "train.seq_len": 64}).to_dict()
    del saved["train"]["val_tokens"]
    saved["train"]["eval_batches"] = 3
    saved["data"]["jsonl_field"] = saved["data"].pop("text_field")
    saved["data"]["jsonl_field"] = "body"
    cfg = from_dict(saved)
    assert cfg.train.val_tokens == 3 * 8 * 64 and cfg.data.text_field == "body"


def test_validation_is_sized_in_tokens_and_reports_a_standard_error():
    import torch

    from petra.config import ModelConfig
    from petra.model import build_model
    from petra.validation import evaluate

    tokens = np.random.default_rng(0).integers(0, 100, 5000).astype(np.uint16)
    v = val_batches(tokens, 16, 4, 1000)  # 1000 tokens: 62 windows, whole batches of 4 -> 60
    assert sum(len(x) for x, _ in v) == 60
    assert sum(len(x) for x, _ in val_batches(tokens, 16, 4, 10**9)) == (5000 - 1) // 16 // 4 * 4  # all of it
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=16,
        ),
        "cpu",
        torch.float32,
    )
    mean, se = evaluate(model, v, "cpu")
    rows = torch.cat([model(x, y, per_row=True) for x, y in v]).double()
    assert mean == pytest.approx(rows.mean().item(), rel=1e-9)
    assert se == pytest.approx((rows.std() / len(rows) ** 0.5).item(), rel=1e-6) and se > 0
    assert mean == pytest.approx(torch.stack([model(x, y) for x, y in v]).double().mean().item(), rel=1e-5)
