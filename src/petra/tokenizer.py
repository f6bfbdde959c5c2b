"""Tokenizers: a `tokenizers` byte-level BPE (trained by petra or the user's tokenizer.json)
or a SentencePiece model, behind one small interface."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .config import ConfigError

EOS = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper over a `tokenizers` BPE or a SentencePiece model."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise ConfigError("a SentencePiece tokenizer needs `pip install sentencepiece`") from None
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as e:  # a damaged or foreign file: sentencepiece raises RuntimeError or OSError
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"tokenizer {str(path)!r} is not a valid SentencePiece .model ({first})") from None
            self._tok = None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
            self.bos_id, self.unk_id, self.pad_id = self._sp.bos_id(), self._sp.unk_id(), self._sp.pad_id()
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(str(path))
            except Exception as e:
                raise ConfigError(f"tokenizer {str(path)!r} is not a valid tokenizer.json ({e})") from None
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size()
            eos = self._tok.token_to_id(EOS)
            self.eos_id = eos if eos is not None else self.vocab_size - 1
            self.bos_id = self.unk_id = self.pad_id = -1

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned type holding every id: what token files store."""
        return np.dtype(np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids followed by EOS. The BPE encodes the batch on every core (Rust)."""
        seqs = self._sp.encode(texts) if self._sp is not None else (e.ids for e in self._tok.encode_batch_fast(texts))
        out = []
        for s in seqs:
            a = np.empty(len(s) + 1, dtype=self.dtype)
            a[:-1] = s
            a[-1] = self.eos_id
            out.append(a)
        return out

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


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: Path) -> None:
    """A byte-level BPE (no unknown tokens) with EOS as its one special token, saved atomically."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
