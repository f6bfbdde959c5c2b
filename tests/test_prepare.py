"""`petra data prepare`: every input format, shards and manifest, resume, determinism and
bounded memory; training on prepared data."""

import gzip
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from petra.cli import main
from petra.config import ConfigError, DataConfig
from petra.data import TokenSpace, prepare
from petra.prepare import MANIFEST, PROGRESS, prepare_corpus
from petra.sources import bible_documents, documents
from petra.tokenizer import Tokenizer

QUIET = dict(log=lambda *a: None, show_progress=False)


def records(n=400):
    """Bible chapters as keyed records: the same documents in every format."""
    docs = [d for d in bible_documents("kjv")][:n]
    return [{"key": f"k{i}:{d.key}", "text": d.text} for i, d in enumerate(docs)]


def write(path, recs):
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"key": [r["key"] for r in recs], "text": [r["text"] for r in recs]}), path, row_group_size=50
        )
        return path
    if ".txt" in name:
        data = "\n\n".join(r["text"] for r in recs).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def manifest(path):
    return json.loads((path / MANIFEST).read_text())


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet"])
def test_every_format_reads_the_same_documents_as_plain_json_lines(tmp_path, fmt):
    recs = records(120)
    plain = write(tmp_path / "c.jsonl", recs)
    other = write(tmp_path / f"c.{fmt}", recs)
    a = list(documents(DataConfig(source=str(plain))))
    b = list(documents(DataConfig(source=str(other))))
    assert a == b and len(a) == 120
    out = {}
    for name, src in (("plain", plain), ("other", other)):
        m = prepare_corpus(DataConfig(source=str(src)), tmp_path / name, 300, sample_chars=10**6, **QUIET)
        out[name] = m
    assert out["plain"]["tokens"] == out["other"]["tokens"]
    digests = {k: [s["train"]["sha256"] for s in m["shards"]] for k, m in out.items()}
    assert digests["plain"] == digests["other"]


def test_compressed_text_files_split_and_key_like_the_plain_file(tmp_path):
    recs = records(60)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = list(documents(DataConfig(source=str(write(tmp_path / "a" / "t.txt", recs)))))
    zipped = list(documents(DataConfig(source=str(write(tmp_path / "b" / "t.txt.gz", recs)))))
    assert plain == zipped and plain[0].key == "t.txt:0"


def test_directories_globs_and_several_sources_in_order(tmp_path):
    recs = records(90)
    write(tmp_path / "p1.jsonl", recs[:30])
    write(tmp_path / "p2.jsonl.zst", recs[30:60])
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "p3.parquet", recs[60:])
    keys = [d.key for d in documents(DataConfig(source=str(tmp_path)))]
    assert keys == [r["key"] for r in recs]
    globbed = [d.key for d in documents(DataConfig(source=f"{tmp_path}/p*.jsonl*,{tmp_path}/sub"))]
    assert globbed == keys
    with pytest.raises(ConfigError, match="matches no"):
        list(documents(DataConfig(source=f"{tmp_path}/*.csv")))


def test_bad_parquet_and_json_inputs_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"x.parquet has no column 'text' .*columns are: content"):
        list(documents(DataConfig(source=str(tmp_path / "x.parquet"))))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "y.parquet")
    with pytest.raises(ConfigError, match="y.parquet row 1 has no string in column 'text'"):
        list(documents(DataConfig(source=str(tmp_path / "y.parquet"))))
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{broken\n'))
    with pytest.raises(ConfigError, match=r"z.jsonl.gz:2 is not valid JSON"):
        list(documents(DataConfig(source=str(tmp_path / "z.jsonl.gz"))))


def test_shards_manifest_and_one_token_space(tmp_path):
    src = write(tmp_path / "c.jsonl", records(300))
    m = prepare_corpus(DataConfig(source=str(src)), tmp_path / "p", 400, shard_tokens=20_000, **QUIET)
    assert len(m["shards"]) > 3 and m["split"]["rule"] == "document"
    assert m["documents"]["train"] + m["documents"]["val"] == 300
    ends = [s["documents"] for s in m["shards"]]
    assert ends[0][0] == 0 and ends[-1][1] == 300 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    for s in m["shards"]:
        for part in ("train", "val"):
            f = tmp_path / "p" / s[part]["file"]
            assert hashlib.sha256(f.read_bytes()).hexdigest() == s[part]["sha256"]
            assert f.stat().st_size == 2 * s[part]["tokens"]
    whole = np.concatenate([np.fromfile(tmp_path / "p" / s["train"]["file"], np.uint16) for s in m["shards"]])
    space = TokenSpace([tmp_path / "p" / s["train"]["file"] for s in m["shards"]], "uint16")
    assert len(space) == len(whole) == m["tokens"]["train"]
    first = m["shards"][0]["train"]["tokens"]
    for a, b in [(0, 10), (first - 5, first + 7), (3, len(whole)), (len(whole) - 1, len(whole) + 4)]:
        assert (space[a:b] == whole[a:b]).all()  # reads across shard ends, clipped at the end
    tail = space.range(100, 200)
    assert len(tail) == 100 and (tail[5:15] == whole[105:115]).all()
    # the tokens decode to the corpus, each document ended by EOS
    tok = Tokenizer(tmp_path / "p" / "tokenizer.json")
    assert int((whole == tok.eos_id).sum()) == m["documents"]["train"]


def test_the_same_input_prepared_twice_gives_identical_shards_and_tokenizer(tmp_path):
    src = write(tmp_path / "c.jsonl.zst", records(200))
    a = prepare_corpus(DataConfig(source=str(src)), tmp_path / "a", 500, shard_tokens=30_000, **QUIET)
    b = prepare_corpus(DataConfig(source=str(src)), tmp_path / "b", 500, shard_tokens=30_000, **QUIET)
    assert a["sha256"] == b["sha256"] and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    # asked again, the finished directory is returned as it is
    assert prepare_corpus(DataConfig(source=str(src)), tmp_path / "a", 500, shard_tokens=30_000, **QUIET) == a


def test_a_killed_prepare_resumes_after_its_finished_shards_and_ends_identical(tmp_path, monkeypatch):
    src = write(tmp_path / "c.jsonl", records(300))
    cfg = DataConfig(source=str(src))
    whole = prepare_corpus(cfg, tmp_path / "whole", 400, shard_tokens=20_000, **QUIET)
    calls = {"n": 0}
    real = Tokenizer.encode_documents

    def dies_on_the_ninth_batch(self, texts):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_documents", dies_on_the_ninth_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg, tmp_path / "cut", 400, shard_tokens=20_000, **QUIET)
    state = json.loads((tmp_path / "cut" / PROGRESS).read_text())
    done = len(state["shards"])
    assert 0 < done < len(whole["shards"]) and not (tmp_path / "cut" / MANIFEST).exists()
    assert not list((tmp_path / "cut").glob("*.tmp"))  # the unfinished shard is gone
    monkeypatch.setattr(Tokenizer, "encode_documents", real)
    logs = []
    resumed = prepare_corpus(cfg, tmp_path / "cut", 400, shard_tokens=20_000, log=logs.append, show_progress=False)
    assert any(f"resuming after {done} finished shard" in line for line in logs)
    assert resumed["sha256"] == whole["sha256"] and resumed["shards"] == whole["shards"]
    assert not (tmp_path / "cut" / PROGRESS).exists()


def test_prepare_refuses_to_mix_inputs_or_write_into_foreign_directories(tmp_path):
    a = write(tmp_path / "a.jsonl", records(40))
    b = write(tmp_path / "b.jsonl", records(50))
    prepare_corpus(DataConfig(source=str(a)), tmp_path / "p", 300, **QUIET)
    with pytest.raises(ConfigError, match="already holds prepared data of other input"):
        prepare_corpus(DataConfig(source=str(b)), tmp_path / "p", 300, **QUIET)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no petra data"):
        prepare_corpus(DataConfig(source=str(a)), tmp_path / "q", 300, **QUIET)
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"


def test_the_tokenizer_sample_is_bounded_even_and_leaves_validation_out(tmp_path):
    from petra.prepare import scan
    from petra.sources import split_of

    recs = records(1000)
    src = write(tmp_path / "c.jsonl", recs)
    cfg = DataConfig(source=str(src))
    budget = 500_000
    sc, sample = scan(cfg, budget)
    assert sc.sample_characters == sum(len(t) for t in sample) <= budget
    index = {r["text"]: i for i, r in enumerate(recs)}
    picked = [index[t] for t in sample]
    assert picked == sorted(picked)  # in corpus order
    assert all(split_of(recs[i]["key"], 0.05) == "train" for i in picked)
    # drawn from the whole corpus, not its beginning
    assert min(picked) < 100 and max(picked) > 900
    full, everything = scan(cfg, 10**9)
    assert full.sample_documents == full.documents["train"] and len(everything) == full.documents["train"]


def _prepare_peak_bytes(tmp_path, megabytes: int) -> int:
    """Peak RSS of `petra data prepare` in its own process on a generated JSON-lines corpus."""
    src = tmp_path / f"c{megabytes}.jsonl"
    chapters = [d.text for d in bible_documents("kjv")]
    with src.open("w") as f:
        size, i = 0, 0
        while size < megabytes * 1_000_000:
            line = json.dumps({"key": f"d{i}", "text": chapters[i % len(chapters)]}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    # VmHWM: this process's own high-water mark (getrusage would count pytest's RSS copied at fork)
    child = (
        "import sys; from petra.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)"
    )
    out = tmp_path / f"p{megabytes}"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            child,
            "data",
            "prepare",
            str(src),
            "--out",
            str(out),
            "--vocab-size",
            "1024",
            "--sample-mb",
            "10",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest(out)["tokens"]["train"] > 0.2 * megabytes * 1_000_000  # every document was tokenized
    src.unlink()
    return int(proc.stdout.rsplit("PEAK ", 1)[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_bounded_memory_on_a_200mb_corpus(tmp_path):
    """Five times the corpus, the same peak memory: nothing held grows with the input."""
    small = _prepare_peak_bytes(tmp_path, 40)
    large = _prepare_peak_bytes(tmp_path, 200)
    assert large < 1.5 * 2**30
    assert large < small + 64 * 2**20, (small, large)


def test_train_on_a_prepared_directory_and_its_tokenizer_check(tmp_path, capsys):
    src = write(tmp_path / "c.parquet", records(400))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "p"), "--vocab-size", "400"]) == 0
    assert "train on it with --data" in capsys.readouterr().out
    data = prepare(DataConfig(source=str(tmp_path / "p")), 256)
    assert data.vocab_size == 400 and data.fingerprint.startswith("prepared:")
    assert len(data.train) == manifest(tmp_path / "p")["tokens"]["train"]
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "p"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        "train.val_tokens=64",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["val_loss_se"] > 0 and summary["val_tokens"] == 64
    other = tmp_path / "other.json"
    other.write_bytes((tmp_path / "p" / "tokenizer.json").read_bytes().replace(b'"<|endoftext|>"', b'"<|end|>"'))
    with pytest.raises(ConfigError, match="is not the tokenizer .* was prepared with"):
        prepare(DataConfig(source=str(tmp_path / "p"), tokenizer=str(other)), 256)


def test_data_prepared_before_token_shards_still_opens(tmp_path, cache_dir):
    """A cache directory of the old layout (train.bin, val.bin, done) is read as it is."""
    from petra.data import _hash
    from petra.sources import corpus_fingerprint

    cfg = DataConfig(source="bible", cache_dir=str(tmp_path))
    new = prepare(DataConfig(source="bible", cache_dir=cache_dir), 2048, log=lambda *a: None)
    corpus_fp = corpus_fingerprint(cfg)
    bpe = tmp_path / "tokenizers" / f"bpe-{_hash(corpus_fp, '0.05', '2048')}.json"
    bpe.parent.mkdir(parents=True)
    bpe.write_bytes(new.tokenizer.path.read_bytes())
    tdir = tmp_path / "tokens" / _hash(corpus_fp, "0.05", _hash(bpe.name))
    tdir.mkdir(parents=True)
    np.asarray(new.train[:5000]).tofile(tdir / "train.bin")
    np.asarray(new.val[:700]).tofile(tdir / "val.bin")
    (tdir / "meta.json").write_text(json.dumps({"dtype": "uint16", "tokenizer": str(bpe)}))
    (tdir / "done").touch()
    old = prepare(cfg, 2048)
    assert len(old.train) == 5000 and (old.train[:5000] == new.train[:5000]).all() and len(old.val) == 700
    assert old.fingerprint == new.fingerprint
