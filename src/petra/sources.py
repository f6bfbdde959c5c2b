"""Documents from anywhere, one at a time: the bundled Bible, a `petra data build` corpus,
and user files (.txt, .jsonl, either gzip or zstd compressed, .parquet), directories and
glob patterns of them.

Every reader streams: nothing holds more than one document (or one parquet record batch),
so reading a 50 GB corpus takes the memory of reading a 5 MB one. Each document has a key;
the train/validation split hashes the key, so the same passage in two Bible translations
always lands on the same side.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import importlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .config import ConfigError, DataConfig

# pythonbible translation packages (all public domain); kjv and asv come with petra itself.
DEFAULT_TRANSLATIONS = ("kjv", "asv")

# what a user file may be: text or JSON lines (each optionally compressed; C4 names its JSON
# lines .json.gz), or parquet
SUFFIXES = tuple(f"{kind}{z}" for kind in (".txt", ".jsonl", ".json") for z in ("", ".gz", ".zst")) + (".parquet",)
_CHUNK = 1 << 20  # bytes read from a file at a time
_MAX_PARAGRAPH = 1 << 20  # a text file's paragraph is cut (at a line end) past this many characters


@dataclass(frozen=True)
class Document:
    key: str  # what the train/val split hashes
    text: str


def split_of(key: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


# -- the bundled corpus -----------------------------------------------------------------

_VERSE_NUMBER = re.compile(r"^\d+\.\s*")  # "12. " before each verse; KJV's [italics] brackets go too


# Some translations' texts (Leeser, Diaglot) hold Windows-1252 punctuation (quotes, dashes)
# decoded as Latin-1: C1 control characters. Each maps back to the character it was.
_CP1252 = {c: bytes([c]).decode("cp1252") for c in range(0x80, 0xA0) if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}


def fix_cp1252(text: str) -> str:
    """Text with the C1 control characters that are Windows-1252 punctuation made that punctuation."""
    return text.translate(_CP1252)


def bible_documents(translation: str) -> Iterator[Document]:
    """One document per chapter, verse numbers removed; keyed by chapter, not translation."""
    try:
        mod = importlib.import_module(f"pythonbible_{translation}.plain_text_bible")
    except ImportError:
        raise ConfigError(
            f"Bible translation {translation!r} is not installed; "
            f"pip install pythonbible-{translation}  (or pip install 'petra[corpus]')"
        ) from None
    bible = mod.bible
    content, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    chapters: dict[int, list[str]] = {}
    for vid in sorted(starts):
        verse = _VERSE_NUMBER.sub("", content[starts[vid] : ends[vid]].strip())
        chapters.setdefault(vid // 1000, []).append(verse.replace("[", "").replace("]", ""))
    for chap, verses in chapters.items():
        yield Document(f"bible:{chap}", fix_cp1252(" ".join(v for v in verses if v)))


# -- text ---------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # control characters that are not white space


def _check_text(data: bytes, text: str, encoding: str, where: str, offset: int, sample: bool) -> None:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(f"{where} is not text: it holds a NUL byte at byte {offset + nul} (a binary file?)")
    head = text[: 1 << 20] if sample else ""
    if head and len(_CONTROL.findall(head)) > 0.01 * len(head):
        raise ConfigError(
            f"{where} is not text: over 1% of its characters are control characters "
            f"(a binary file, or the wrong data.encoding={encoding!r}?)"
        )


def _undecodable(e: UnicodeDecodeError, data: bytes, encoding: str, where: str, offset: int) -> ConfigError:
    return ConfigError(
        f"{where} is not valid {encoding}: byte {offset + e.start} (0x{data[e.start]:02x}) cannot "
        f"be decoded; if the file is in another encoding, set data.encoding (e.g. latin-1, cp1252)"
    )


def decode_text(data: bytes, encoding: str, where: str, offset: int = 0) -> str:
    """`data` decoded, or a ConfigError naming `where` and the byte offset: text is never
    changed silently (no replacement characters) and binary files are never trained on."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        _check_text(data, "", encoding, where, offset, False)  # a NUL is the clearer message
        raise _undecodable(e, data, encoding, where, offset) from None
    _check_text(data, text, encoding, where, offset, True)
    return text


def _decoded_chunks(f: BinaryIO, encoding: str, where: str) -> Iterator[str]:
    """A binary stream decoded piece by piece (multi-byte characters may straddle pieces)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    while True:
        data = f.read(_CHUNK)
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            _check_text(data, "", encoding, where, offset, False)
            raise _undecodable(e, data, encoding, where, offset) from None
        _check_text(data, text, encoding, where, offset, offset == 0)
        offset += len(data)
        if text:
            yield text
        if not data:
            return


def _paragraphs(chunks: Iterator[str]) -> Iterator[str]:
    """Blank-line separated paragraphs, exactly as `text.split("\\n\\n")` of the whole text
    would give them, with Windows line ends (CRLF) read as LF; one longer than _MAX_PARAGRAPH
    is cut at a line end so memory stays bounded."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        held = "\r" if text.endswith("\r") else ""  # its "\n" may start the next chunk
        parts = text[: len(text) - len(held)].replace("\r\n", "\n").split("\n\n")
        parts[-1] += held
        carry = parts.pop()
        yield from parts
        while len(carry) > _MAX_PARAGRAPH:
            cut = carry.rfind("\n", 0, _MAX_PARAGRAPH) + 1 or _MAX_PARAGRAPH
            yield carry[:cut]
            carry = carry[cut:]
    yield carry


def text_documents(paragraphs: Iterator[str], name: str) -> Iterator[Document]:
    """Paragraphs grouped into ~4 KB documents."""
    buf: list[str] = []
    size = n = 0
    for para in paragraphs:
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


# -- files ---------------------------------------------------------------------------------


class _Counted(io.RawIOBase):
    """A file that reports every byte read from disk (compressed bytes for .gz/.zst), so
    progress is exact against the files' sizes."""

    def __init__(self, f: BinaryIO, advance: Callable[[int], None]):
        self.f, self.advance = f, advance

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.advance(n or 0)
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _open(path: Path, advance: Callable[[int], None]) -> BinaryIO:
    raw = io.BufferedReader(_Counted(path.open("rb", buffering=0), advance), _CHUNK)
    name = path.name
    if name.endswith(".gz"):
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(
                f"{path} is zstd-compressed: pip install zstandard  (or pip install 'petra[corpora]')"
            ) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), _CHUNK)
    return raw


def jsonl_documents(
    path: Path, field: str, encoding: str = "utf-8", advance: Callable[[int], None] = lambda n: None
) -> Iterator[Document]:
    with _open(path, advance) as f:
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
                raise ConfigError(
                    f"{path}:{i + 1} has no string field {field!r} (set --text-field, or data.text_field)"
                )
            key, text = str(rec.get("key", f"{path.name}:{i}")), rec[field]
            if len(text) <= _MAX_PARAGRAPH:
                yield Document(key, text)
            else:  # a huge record is cut like a text file's paragraphs; every piece keeps its split
                yield from (Document(key, piece) for piece in _paragraphs(iter([text])) if piece)


def _uncompressed_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".zst")


def text_file_documents(
    path: Path, encoding: str = "utf-8", advance: Callable[[int], None] = lambda n: None
) -> Iterator[Document]:
    with _open(path, advance) as f:
        yield from text_documents(_paragraphs(_decoded_chunks(f, encoding, str(path))), _uncompressed_name(path))


def parquet_documents(path: Path, field: str, advance: Callable[[int], None] = lambda n: None) -> Iterator[Document]:
    """One document per row, read a record batch at a time; keyed by a `key` column if the
    file has one, else by file and row."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path} is parquet: pip install pyarrow  (or pip install 'petra[corpora]')") from None
    try:  # buffered reads of one column chunk at a time: memory is a record batch, not a row group
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ConfigError(f"{path} is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(
            f"{path} has no column {field!r} (set --text-field, or data.text_field); "
            f"its columns are: {', '.join(names)}"
        )
    columns = [field] + (["key"] if "key" in names and field != "key" else [])
    rows, size = max(1, pf.metadata.num_rows), path.stat().st_size
    row = 0
    batches = (
        b
        for g in range(pf.num_row_groups)
        for b in pf.iter_batches(batch_size=1024, row_groups=[g], columns=columns, use_threads=False)
    )
    for batch in batches:
        texts = batch.column(field).to_pylist()
        keys = batch.column("key").to_pylist() if len(columns) > 1 else None
        for j, text in enumerate(texts):
            if not isinstance(text, str):
                raise ConfigError(f"{path} row {row + j} has no string in column {field!r} (got {text!r:.40})")
            yield Document(str(keys[j]) if keys is not None else f"{path.name}:{row + j}", text)
        advance(size * (row + len(texts)) // rows - size * row // rows)
        row += len(texts)


def file_documents(path: Path, cfg: DataConfig, advance: Callable[[int], None] = lambda n: None) -> Iterator[Document]:
    name = _uncompressed_name(path)
    if name.endswith(".parquet"):
        return parquet_documents(path, cfg.text_field, advance)
    if name.endswith((".jsonl", ".json")):
        return jsonl_documents(path, cfg.text_field, cfg.encoding, advance)
    return text_file_documents(path, cfg.encoding, advance)


def _usable(p: Path) -> bool:
    return p.is_file() and p.name.endswith(SUFFIXES)


def _walk(root: Path) -> Iterator[Path]:
    """Every file under root; symlinked directories are not entered (a link back into the tree
    would read it again, or forever)."""
    for d, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for n in sorted(names):
            yield Path(d) / n


def _hidden(names: tuple[str, ...]) -> bool:
    return any(n.startswith(".") for n in names)


def _glob(pattern: str) -> list[Path]:
    """The files a glob pattern matches, `**` for any depth, without entering symlinked
    directories (Python's glob follows them)."""
    parts = Path(pattern).parts
    fixed = next((i for i, c in enumerate(parts) if any(m in c for m in "*?[")), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = parts[fixed:]

    def match(names: tuple[str, ...], pats: tuple[str, ...]) -> bool:
        if not pats:
            return not names
        if pats[0] == "**":  # zero or more directories, hidden ones not, as glob
            return any(match(names[k:], pats[1:]) for k in range(len(names) + 1) if not _hidden(names[:k]))
        ok = names and fnmatch.fnmatchcase(names[0], pats[0]) and not (_hidden(names[:1]) and pats[0][0] != ".")
        return bool(ok) and match(names[1:], pats[1:])

    if not root.is_dir():
        return []
    return [f for f in _walk(root) if match(f.relative_to(root).parts, rest)]


def user_files(spec: str) -> list[Path]:
    """The files a comma-separated list of files, directories and glob patterns names, in
    order; a file named twice (by two patterns, or a link and its target) is refused."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        p = Path(part).expanduser()
        if part == "bible":
            raise ConfigError(
                "data.source: 'bible' (the bundled corpus) cannot be combined with other sources; use it "
                "alone, or build a corpus that holds it (petra data build) and list that directory"
            )
        if any(c in part for c in "*?["):
            found = [q for q in _glob(str(p)) if _usable(q)]
            if not found:
                raise ConfigError(f"data.source pattern {part!r} matches no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_dir():
            if (p / "manifest.json").is_file() and any(p.glob("shard-*.bin")):
                raise ConfigError(
                    f"{str(p)!r} holds prepared token shards, not text: train on it with --data {p} "
                    f"(alone), or give `petra data prepare` its original sources"
                )
            found = [q for q in _walk(p) if _usable(q)]
            if not found:
                raise ConfigError(f"data.source directory {str(p)!r} holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise ConfigError(f"data.source file {str(p)!r} must end in one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise ConfigError(
                f"data.source {str(p)!r} does not exist; use 'bible', a directory from "
                f"`petra data build` or `petra data prepare`, or {'/'.join(SUFFIXES)} files, "
                f"directories or glob patterns"
            )
    seen: dict[str, Path] = {}
    for f in files:
        real = os.path.realpath(f)
        if real in seen:
            same = f"as {seen[real]} and {f}" if str(seen[real]) != str(f) else "twice"
            raise ConfigError(f"data.source names the file {real} {same}; name each file once")
        seen[real] = f
    return files


def is_built(path: Path) -> bool:
    """A directory written by `petra data build`."""
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "manifest.json").is_file()


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Changes when the corpus's content does; cheap (no text is read)."""
    if cfg.source == "bible":
        return "bible:" + ",".join(DEFAULT_TRANSLATIONS) + ":v1"
    path = Path(cfg.source).expanduser()
    if is_built(path):
        return "built:" + json.loads((path / "manifest.json").read_text())["sha256"]
    h = hashlib.sha256()
    for f in user_files(cfg.source):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{cfg.text_field}:{cfg.encoding}".encode())
    return "files:" + h.hexdigest()


def input_files(cfg: DataConfig) -> list[Path]:
    """The files the source reads, in order (none for the bundled Bible)."""
    if cfg.source == "bible":
        return []
    path = Path(cfg.source).expanduser()
    return [path / "corpus.jsonl"] if is_built(path) else user_files(cfg.source)


def documents(cfg: DataConfig, advance: Callable[[int], None] = lambda n: None) -> Iterator[Document]:
    """Every document of the source, in a fixed order, streamed."""
    if cfg.source == "bible":
        for t in DEFAULT_TRANSLATIONS:
            yield from bible_documents(t)
        return
    path = Path(cfg.source).expanduser()
    if is_built(path):
        yield from jsonl_documents(path / "corpus.jsonl", "text", advance=advance)
        return
    for f in user_files(cfg.source):
        yield from file_documents(f, cfg, advance)
