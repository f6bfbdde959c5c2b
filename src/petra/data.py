"""Data for training: prepared token shards read as one token space, deterministic batches
and the fixed validation set.

`prepare(cfg)` opens a directory written by `petra data prepare`, or prepares any other
source (the bundled Bible, a `petra data build` corpus, user files) once into the cache
with the same streaming pipeline (prepare.py) and opens that. Nothing is downloaded at run
time, and nothing held in memory grows with the corpus: tokens stay in memory-mapped files
and the batch order is computed, not stored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .prepare import MANIFEST, file_sha256, is_prepared, prepare_corpus, verify
from .sources import corpus_fingerprint
from .tokenizer import Tokenizer


class TokenSpace:
    """Token files read as one sequence through memory maps (nothing is loaded), or the
    range [start, stop) of it. Indexing with a slice returns a numpy array."""

    def __init__(self, files: list[Path], dtype: np.dtype | str):
        self._maps = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size]
        self._ends = np.cumsum([len(m) for m in self._maps], dtype=np.int64)
        self.dtype = np.dtype(dtype)
        self.start, self.stop = 0, int(self._ends[-1]) if len(self._ends) else 0

    def range(self, start: int, stop: int) -> TokenSpace:
        view = object.__new__(TokenSpace)
        view._maps, view._ends, view.dtype = self._maps, self._ends, self.dtype
        view.start, view.stop = self.start + start, self.start + stop
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenSpace is read by contiguous slices")
        s, e, _ = key.indices(len(self))
        s, e = s + self.start, max(s, e) + self.start
        pieces = []
        while s < e:  # a window may span the end of one shard and the start of the next
            k = int(np.searchsorted(self._ends, s, side="right"))
            begin = int(self._ends[k - 1]) if k else 0
            end = min(e, int(self._ends[k]))
            pieces.append(self._maps[k][s - begin : end - begin])
            s = end
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)


@dataclass
class TokenData:
    train: TokenSpace
    val: TokenSpace
    tokenizer: Tokenizer
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def open_prepared(path: Path, fingerprint: str) -> TokenData:
    """The train and validation token spaces of a prepared directory."""
    m = json.loads((path / MANIFEST).read_text())
    shards = m["shards"]
    tokenizer = Tokenizer(path / m["tokenizer"]["file"])
    train = TokenSpace([path / s["train"]["file"] for s in shards], m["dtype"])
    if m["split"]["rule"] == "token-tail":
        cut = m["split"]["cut"]
        return TokenData(train.range(0, cut), train.range(cut, len(train)), tokenizer, fingerprint)
    val = TokenSpace([path / s["val"]["file"] for s in shards], m["dtype"])
    return TokenData(train, val, tokenizer, fingerprint)


def prepare(cfg: DataConfig, vocab_size: int, log=print, show_progress: bool = False) -> TokenData:
    """The tokens of cfg's source: a prepared directory as it is, anything else prepared once
    into the cache (keyed by the corpus's content, the split and the tokenizer)."""
    source = Path(cfg.source).expanduser()
    user_tok = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    if user_tok is not None and not user_tok.is_file():
        raise ConfigError(f"data.tokenizer {str(user_tok)!r} does not exist")
    if cfg.source != "bible" and is_prepared(source):
        m = json.loads((source / MANIFEST).read_text())
        problem = verify(source, m)
        if problem is not None:
            raise ConfigError(
                f"data.source {str(source)!r}: {problem}; nothing was trained on it. Prepare it again: "
                f"petra data prepare {m['settings']['source']} --out NEW_DIRECTORY"
            )
        if user_tok is not None and file_sha256(user_tok) != m["tokenizer"]["sha256"]:
            raise ConfigError(
                f"data.tokenizer {str(user_tok)!r} is not the tokenizer {source} was prepared with; "
                f"leave data.tokenizer empty or prepare the corpus with this tokenizer"
            )
        return open_prepared(source, "prepared:" + m["sha256"])

    cache = Path(cfg.cache_dir).expanduser()
    corpus_fp = corpus_fingerprint(cfg)
    if user_tok is not None:
        tok_fp = _hash(str(user_tok.resolve()), file_sha256(user_tok))
    else:  # one BPE per corpus, split and size, kept beside the token caches
        bpe = cache / "tokenizers" / f"bpe-{_hash(corpus_fp, str(cfg.val_fraction), str(vocab_size))}.json"
        tok_fp = _hash(bpe.name)
    fp = _hash(corpus_fp, str(cfg.val_fraction), tok_fp)
    tdir = cache / "tokens" / fp
    if (tdir / "done").exists():  # written before token shards: one train.bin and one val.bin
        meta = json.loads((tdir / "meta.json").read_text())
        tok = Tokenizer(Path(meta["tokenizer"]) if user_tok is None else user_tok)
        return TokenData(
            TokenSpace([tdir / "train.bin"], meta["dtype"]), TokenSpace([tdir / "val.bin"], meta["dtype"]), tok, fp
        )
    if is_prepared(tdir):
        problem = verify(tdir, json.loads((tdir / MANIFEST).read_text()))
        if problem is not None:  # petra's own cache: made again, never trained on
            log(f"the token cache is damaged ({problem}); preparing it again")
            shutil.rmtree(tdir)
    if not is_prepared(tdir):
        given = user_tok if user_tok is not None else (bpe if bpe.is_file() else None)
        prepare_corpus(
            cfg, tdir, vocab_size, tokenizer=given, log=log, show_progress=show_progress, flag="data.cache_dir"
        )
        if user_tok is None and not bpe.is_file():
            bpe.parent.mkdir(parents=True, exist_ok=True)
            bpe.write_bytes((tdir / "tokenizer.json").read_bytes())
        log(f"tokenized {cfg.source!r} -> {tdir}")
    return open_prepared(tdir, fp)


# -- the batch order ---------------------------------------------------------------------

_U64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (the products wrap modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel(i: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A pseudo-random bijection of [0, n) chosen by `key`, applied to the indices `i`.

    A balanced Feistel network over the smallest even number of bits that covers n; a value
    it maps outside [0, n) is mapped again until it lands inside (cycle walking), which
    keeps it a bijection of [0, n). It needs no table: the order of 51M windows costs what
    the order of 51 does."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = [np.uint64(_splitmix(key + r)) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    x = encrypt(np.asarray(i, dtype=np.uint64))
    outside = x >= n
    while outside.any():
        x[outside] = encrypt(x[outside])
        outside = x >= n
    return x.astype(np.int64)


class Batches:
    """Training batches as a pure function of (seed, step): non-overlapping windows of
    seq_len+1 tokens, in a fresh pseudo-random order each pass over the data, so a resumed
    run draws exactly the samples the uninterrupted run would have drawn.

    order="feistel" computes each pass's permutation (no table, any corpus size);
    "randperm" is torch.randperm per pass, as runs made before token shards used it."""

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int, order: str = "feistel"):
        self.tokens, self.seq_len, self.batch_size, self.seed, self.order = tokens, seq_len, batch_size, seed, order
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise ConfigError(
                f"the training split has {len(tokens)} tokens, fewer than one sequence "
                f"of {seq_len + 1}; use more data or a shorter train.seq_len"
            )
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permute(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        if self.order == "feistel":
            return feistel(positions, self.windows, _splitmix(self.seed) ^ epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.windows, generator=g).numpy())
        return self._perm[1][positions]

    def sample_ids(self, step: int) -> list[int]:
        i = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epoch, pos = i // self.windows, i % self.windows
        out = np.empty_like(i)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = self._permute(pos[at], int(e))
        return out.tolist()

    def passes(self, steps: int) -> float:
        return steps * self.batch_size / self.windows

    def get(self, step: int, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T) for this step (or a slice of its samples)."""
        ids = self.sample_ids(step)[part]
        return windows_at(self.tokens, [w * self.seq_len for w in ids], self.seq_len)


def windows_at(tokens, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(buf)
    return t[:, :-1], t[:, 1:]


def val_batches(tokens, seq_len: int, batch_size: int, val_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first windows of the validation split, in order, about
    val_tokens tokens of them (the whole split if it is smaller), in whole batches so every
    process evaluates the same number of rows; a split shorter than one batch is repeated
    to fill it."""
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ConfigError(
            f"the validation split has {len(tokens)} tokens, fewer than one sequence of "
            f"{seq_len + 1}; raise data.val_fraction or use more data"
        )
    rows = max(batch_size, min(windows, max(1, val_tokens // seq_len)) // batch_size * batch_size)
    return [
        windows_at(tokens, [((b + i) % windows) * seq_len for i in range(batch_size)], seq_len)
        for b in range(0, rows, batch_size)
    ]
