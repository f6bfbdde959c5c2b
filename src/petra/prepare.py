"""`petra data prepare`: a corpus of any size -> a tokenizer and token shards, in bounded memory.

Two streaming passes over the documents:
1. scan: counts each split's documents and characters (to choose the split rule) and keeps
   an evenly drawn sample of at most `sample_chars` characters for training the BPE;
2. tokenize: documents in batches through the Rust tokenizer (every core), appended to the
   current shard's train and val files.

A shard is a run of whole documents; it is closed when its train part reaches
`shard_tokens`, and its files, checksums and the input position are then recorded in
progress.json, so a killed prepare resumes after its last finished shard. The finished
directory holds manifest.json (inputs, counts, tokenizer hash, split rule, checksums),
the tokenizer, and the shards; training reads the shards as one token space (data.py).
Memory is a batch of documents, the sample and the BPE trainer: not the corpus.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, DataConfig
from .rundir import LOCK, RunDirectory
from .sources import corpus_fingerprint, documents, input_files, split_of
from .tokenizer import Tokenizer, train_tokenizer

FORMAT = "petra-tokens/1"
MANIFEST, PROGRESS = "manifest.json", "progress.json"
STAMPS = ".petra-verified.json"  # (size, mtime, inode) of each file when its hash last matched
SHARD_TOKENS = 1 << 27  # about 134M tokens: 256 MB of uint16 per shard
SAMPLE_CHARS = 200_000_000  # the BPE's training sample
_BATCH_CHARS = 4_000_000  # text per tokenizer call: enough to keep every core busy


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file() and _read(path / MANIFEST).get("format") == FORMAT


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); remove it or prepare again") from None


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -- integrity -------------------------------------------------------------------------------


def _expected(m: dict) -> dict[str, tuple[int | None, str]]:
    """Each file of a prepared directory: its size in bytes (None: any) and sha256."""
    import numpy as np

    itemsize = np.dtype(m["dtype"]).itemsize
    out = {m["tokenizer"]["file"]: (None, m["tokenizer"]["sha256"])}
    for s in m["shards"]:
        for part in ("train", "val"):
            out[s[part]["file"]] = (s[part]["tokens"] * itemsize, s[part]["sha256"])
    return out


def _stat(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def stamp(path: Path, m: dict) -> None:
    """Record the files just written (their hashes were taken while writing) as verified."""
    _save_stamps(path, {name: {"stat": _stat(path / name), "sha256": sha} for name, (_, sha) in _expected(m).items()})


def _save_stamps(path: Path, stamps: dict) -> None:
    try:
        _write(path / STAMPS, stamps)
    except OSError:
        pass  # a read-only corpus: it is hashed again at the next open


def verify(path: Path, m: dict) -> str | None:
    """What is wrong with a prepared directory's shards and tokenizer, or None. Every file's
    size is checked at every open; its sha256 whenever the file changed (size, modification
    time or inode) since its hash last matched the manifest's, so an unchanged corpus costs
    a few stat calls and a changed one is hashed, never trained on."""
    try:
        stamps = json.loads((path / STAMPS).read_text())
    except (OSError, ValueError):
        stamps = {}
    changed = False
    for name, (size, sha) in _expected(m).items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        st = _stat(f)
        if size is not None and st[0] != size:
            return f"{f} holds {st[0]:,} bytes where the manifest says {size:,} (truncated or damaged)"
        if stamps.get(name) == {"stat": st, "sha256": sha}:
            continue
        if file_sha256(f) != sha:
            return f"{f} changed since it was prepared (its sha256 is not the manifest's)"
        stamps[name] = {"stat": st, "sha256": sha}
        changed = True
    if changed:
        _save_stamps(path, stamps)
    return None


# -- pass 1: scan --------------------------------------------------------------------------


@dataclass
class Scan:
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    characters: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    rule: str = "document"
    sample_documents: int = 0
    sample_characters: int = 0


def _priority(index: int) -> int:
    """A document's place in the sample: a hash of its position, so the sample is spread
    evenly over the whole corpus and is the same every time."""
    return int.from_bytes(
        hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"petra-sample").digest(), "little"
    )


def scan(cfg: DataConfig, sample_chars: int, bar=None) -> tuple[Scan, list[str]]:
    """Counts per split, the split rule and (sample_chars > 0) the tokenizer's sample: the
    documents of lowest priority whose text fits in sample_chars, in corpus order. The
    sample leaves out validation documents when the split is by document."""
    s = Scan()
    heap: list[tuple[int, int, str, str]] = []  # (-priority, index, split, text): a max-heap
    held = nonblank = 0
    for i, doc in enumerate(documents(cfg, bar.update if bar is not None else lambda n: None)):
        part = split_of(doc.key, cfg.val_fraction)
        s.documents[part] += 1
        s.characters[part] += len(doc.text)
        if not doc.text or doc.text.isspace():  # what strip() would empty, without copying the text
            continue
        nonblank += 1
        if sample_chars <= 0:
            continue
        p = _priority(i)
        if held + len(doc.text) <= sample_chars or (heap and -heap[0][0] > p):
            heapq.heappush(heap, (-p, i, part, doc.text))
            held += len(doc.text)
            while held > sample_chars and len(heap) > 1:
                held -= len(heapq.heappop(heap)[3])
    if not nonblank:
        raise ConfigError(f"data.source {cfg.source!r} holds no text")
    share = s.characters["val"] / sum(s.characters.values())
    # a corpus of a few documents misses the asked fraction badly (a side empty, or the
    # validation text under a quarter or over twice val_fraction): the tail of the tokens instead
    if not (s.documents["train"] and s.documents["val"] and cfg.val_fraction / 4 <= share <= 2 * cfg.val_fraction):
        s.rule = "token-tail"
    sample = [(i, text) for _, i, part, text in heap if s.rule == "token-tail" or part == "train"]
    sample.sort()
    s.sample_documents, s.sample_characters = len(sample), sum(len(t) for _, t in sample)
    return s, [t for _, t in sample]


# -- pass 2: tokenize into shards ------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to one shard's train and val files, hashing as it writes."""

    def __init__(self, out: Path, index: int, first_doc: int):
        self.out, self.index, self.first_doc = out, index, first_doc
        self.files, self.hashes, self.tokens = {}, {}, {"train": 0, "val": 0}
        for part in ("train", "val"):
            self.files[part] = (out / f"{self.name(part)}.tmp").open("wb")
            self.hashes[part] = hashlib.sha256()

    def name(self, part: str) -> str:
        return f"shard-{self.index:05d}.{part}.bin"

    def write(self, part: str, arrays: list) -> None:
        for a in arrays:
            b = a.tobytes()
            self.files[part].write(b)
            self.hashes[part].update(b)
            self.tokens[part] += len(a)

    def close(self, end_doc: int) -> dict:
        entry = {"documents": [self.first_doc, end_doc]}
        for part, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.out / f"{self.name(part)}.tmp", self.out / self.name(part))
            entry[part] = {
                "file": self.name(part),
                "tokens": self.tokens[part],
                "sha256": self.hashes[part].hexdigest(),
            }
        return entry

    def abandon(self) -> None:
        for part, f in self.files.items():
            f.close()
            (self.out / f"{self.name(part)}.tmp").unlink(missing_ok=True)


def _progress_bar(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=not (show and total),
        dynamic_ncols=True,
        mininterval=1.0,
    )


def _tokenize(cfg: DataConfig, out: Path, tok: Tokenizer, state: dict, rule: str, shard_tokens: int, bar, save) -> None:
    """Pass 2 from the first document no finished shard holds; every finished shard is
    recorded through `save` before the next one starts."""
    start = state["shards"][-1]["documents"][1] if state["shards"] else 0
    writer = _ShardWriter(out, len(state["shards"]), start)
    texts: list[str] = []
    parts: list[str] = []
    t0, tokens = time.perf_counter(), 0

    def flush() -> None:
        nonlocal tokens
        ids = tok.encode_documents(texts)
        for part in ("train", "val"):
            writer.write(part, [a for a, p in zip(ids, parts) if p == part])
        tokens += sum(len(a) for a in ids)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0) / 1e6:.2f}M tokens/s", refresh=False)
        texts.clear()
        parts.clear()

    try:
        i = -1
        held = 0
        batch_chars = min(_BATCH_CHARS, shard_tokens)  # a batch's tokens are fewer than its characters
        for i, doc in enumerate(documents(cfg, bar.update)):
            if i < start:
                continue
            texts.append(doc.text)
            parts.append("train" if rule == "token-tail" else split_of(doc.key, cfg.val_fraction))
            held += len(doc.text)
            if held >= batch_chars or len(texts) >= 8192:
                flush()
                held = 0
                if writer.tokens["train"] >= shard_tokens or writer.tokens["val"] >= shard_tokens:
                    state["shards"].append(writer.close(i + 1))
                    save()
                    writer = _ShardWriter(out, len(state["shards"]), i + 1)
        if texts:
            flush()
        if writer.tokens["train"] or writer.tokens["val"] or not state["shards"]:
            state["shards"].append(writer.close(i + 1))
        else:
            writer.abandon()
    except BaseException:
        writer.abandon()  # an unfinished shard is never mistaken for a finished one
        raise


def _settings(cfg: DataConfig, tokenizer: Path | None, vocab_size: int) -> dict:
    """What the prepared tokens depend on: resuming with anything else would mix two corpora."""
    return {
        "source": cfg.source,
        "fingerprint": corpus_fingerprint(cfg),
        "text_field": cfg.text_field,
        "encoding": cfg.encoding,
        "val_fraction": cfg.val_fraction,
        "tokenizer": file_sha256(tokenizer) if tokenizer else f"bpe-{vocab_size}",
    }


def prepare_corpus(
    cfg: DataConfig,
    out: Path,
    vocab_size: int,
    tokenizer: Path | None = None,
    shard_tokens: int = SHARD_TOKENS,
    sample_chars: int = SAMPLE_CHARS,
    log=print,
    show_progress: bool = True,
    flag: str = "--out",
) -> dict:
    """Prepare cfg's corpus into `out` (or finish an interrupted prepare there); the manifest."""
    out = Path(out)
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens={shard_tokens} must be at least 1")
    if tokenizer is not None and not tokenizer.is_file():
        raise ConfigError(f"data.tokenizer {str(tokenizer)!r} does not exist")
    settings = _settings(cfg, tokenizer, vocab_size)  # reads no text: bad paths fail here, at once
    with RunDirectory(out, flag):
        if (out / MANIFEST).is_file():
            manifest = _read(out / MANIFEST)
            if manifest.get("format") != FORMAT or manifest.get("settings") != settings:
                raise ConfigError(
                    f"{flag} {out} already holds prepared data of other input or settings; choose another {flag}"
                )
            return manifest
        state = _read(out / PROGRESS) if (out / PROGRESS).is_file() else None
        if state is None:
            if any(p.name != LOCK for p in out.iterdir()):
                raise ConfigError(
                    f"{flag} {out} is not empty and holds no petra data; choose an empty or new directory"
                )
            state = {"settings": settings, "shards": []}
        elif state.get("settings") != settings:
            raise ConfigError(
                f"{flag} {out} holds an unfinished prepare of other input or settings; remove it "
                f"or choose another {flag}"
            )
        for stale in out.glob("*.tmp"):
            stale.unlink()

        def save() -> None:
            _write(out / PROGRESS, state)

        total = sum(f.stat().st_size for f in input_files(cfg))
        tok_file = out / ("tokenizer" + (tokenizer.suffix if tokenizer else ".json"))
        if "scan" not in state:
            train_bpe = tokenizer is None
            with _progress_bar(total, show_progress, "scan") as bar:
                t0 = time.perf_counter()
                sc, sample = scan(cfg, sample_chars if train_bpe else 0, bar)
            log(
                f"scanned {sum(sc.documents.values()):,} documents ({sum(sc.characters.values()) / 1e6:,.1f}M "
                f"characters) in {time.perf_counter() - t0:.1f}s; split by {sc.rule}"
            )
            if train_bpe:
                t0 = time.perf_counter()
                train_tokenizer(sample, vocab_size, tok_file)
                size = Tokenizer(tok_file).vocab_size  # fewer than asked when the sample is small
                log(
                    f"trained a {size}-token byte-level BPE on {sc.sample_documents:,} documents "
                    f"({sc.sample_characters / 1e6:,.1f}M characters) in {time.perf_counter() - t0:.1f}s"
                )
            else:
                shutil.copyfile(tokenizer, tok_file)
            del sample
            state["scan"] = asdict(sc)
            save()
        sc = Scan(**state["scan"])
        tok = Tokenizer(tok_file)
        if state["shards"]:
            log(
                f"resuming after {len(state['shards'])} finished shard(s) "
                f"({state['shards'][-1]['documents'][1]:,} documents)"
            )
        if sc.rule == "token-tail":
            log(
                f"{cfg.source!r} has {sum(sc.documents.values())} document(s), too few to split by document at "
                f"data.val_fraction={cfg.val_fraction}: the validation set is the last tokens"
            )
        t0 = time.perf_counter()
        with _progress_bar(total, show_progress, "tokenize") as bar:
            _tokenize(cfg, out, tok, state, sc.rule, shard_tokens, bar, save)
        manifest = _manifest(cfg, state, sc, tok, tok_file, time.perf_counter() - t0)
        _write(out / MANIFEST, manifest)
        stamp(out, manifest)
        (out / PROGRESS).unlink()
        n = manifest["tokens"]
        log(
            f"prepared {n['train'] + n['val']:,} tokens ({n['train']:,} train, {n['val']:,} validation) in "
            f"{len(state['shards'])} shard(s) -> {out}"
        )
        return manifest


def _manifest(cfg: DataConfig, state: dict, sc: Scan, tok: Tokenizer, tok_file: Path, seconds: float) -> dict:
    shards = state["shards"]
    tokens = {p: sum(s[p]["tokens"] for s in shards) for p in ("train", "val")}
    split = {"rule": sc.rule, "val_fraction": cfg.val_fraction, "key": "blake2b-64(key) mod 1e6 < val_fraction"}
    if sc.rule == "token-tail":  # validation is the last val_fraction of the one train stream
        total = tokens["train"]
        split["cut"] = total - max(1, round(cfg.val_fraction * total))
        tokens = {"train": split["cut"], "val": total - split["cut"]}
    digest = hashlib.sha256("".join(s[p]["sha256"] for s in shards for p in ("train", "val")).encode())
    return {
        "format": FORMAT,
        "settings": state["settings"],
        "dtype": tok.dtype.name,
        "inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in input_files(cfg)],
        "tokenizer": {
            "file": tok_file.name,
            "sha256": file_sha256(tok_file),
            "vocab_size": tok.vocab_size,
            "sample_documents": sc.sample_documents,
            "sample_characters": sc.sample_characters,
        },
        "split": split,
        "documents": sc.documents,
        "characters": sc.characters,
        "tokens": tokens,
        "tokenize_seconds": round(seconds, 1),
        "shards": shards,
        "sha256": digest.hexdigest(),
    }
