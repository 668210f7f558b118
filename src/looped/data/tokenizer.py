"""Tokenizers: byte-level BPE fitted on the train split, or plain bytes; both saved as tokenizer.json.

Both are Hugging Face `tokenizers` pipelines with a ByteLevel pre-tokenizer and decoder, so every byte is
representable, decode(encode(s)) == s for any string, and the saved file loads in `transformers` as a
`PreTrainedTokenizerFast`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from looped.data.errors import DataError

EOT = "<|endoftext|>"
FILE = "tokenizer.json"


def byte_symbols() -> list[str]:
    """The 256 visible characters that stand for bytes 0..255 in byte-level BPE (GPT-2's reversible map)."""
    # Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen)
    # are moved, in byte order, to code points from U+0100 on, so that every token is a visible string.
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, moved = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def _byte_level(hf: HFTokenizer, use_regex: bool) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    return hf


def _ids(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


class Tokenizer:
    """A Hugging Face tokenizer with the few operations training needs; `kind` is "bpe" or "bytes"."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        # Document text that happens to spell "<|endoftext|>" stays text; the end-of-text token is only ever
        # inserted by id (prepare), so a document cannot forge a boundary.
        self.hf.encode_special_tokens = True
        self.kind: Literal["bpe", "bytes"] = "bytes" if hf.get_vocab() == _BYTE_VOCAB else "bpe"

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE with one special token, `<|endoftext|>`.

        Args:
            texts: The training text (the train split only, so validation stays unseen).
            vocab_size: The target vocabulary, special token and 256 byte symbols included; a small corpus
                may stop short of it.
            progress: Show the trainer's progress bars.

        Returns:
            The trained tokenizer; the same texts and vocab_size give the same tokenizer.
        """
        if vocab_size < 257:
            raise DataError(f"a BPE vocab_size must be ≥ 257 (256 bytes + end-of-text), got {vocab_size}")
        hf = _byte_level(HFTokenizer(models.BPE()), use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            # All 256 byte symbols from the start, so bytes the corpus lacks still encode.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def bytes(cls) -> Tokenizer:
        """Plain bytes: 256 ids, id == byte value, no special tokens (a BPE model without merges)."""
        hf = HFTokenizer(models.BPE(vocab=dict(_BYTE_VOCAB), merges=[]))
        return cls(_byte_level(hf, use_regex=False))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the one in a folder."""
        file = _file(path)
        if not file.is_file():
            raise DataError(f"no tokenizer at {file}")
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise DataError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (into `path` if it is a folder, else to `path`); returns the file written."""
        file = _file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(file))
        return file

    @property
    def vocab_size(self) -> int:
        """The number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """The id of `<|endoftext|>`, or None (the bytes tokenizer has no special tokens)."""
        return self.hf.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel."""
        if self.kind == "bytes":
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Token ids of `text` as a 1-D array, without a Python int per byte for the bytes tokenizer."""
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens are spelled out, bytes that are not UTF-8 become U+FFFD."""
        ids = _ids(ids)
        if self.kind == "bytes":
            # The same result as the tokenizer.json pipeline, without mapping through byte symbols.
            if ids and not 0 <= min(ids) <= max(ids) <= 255:
                raise DataError(f"byte ids must be in 0..255, got {min(ids)}..{max(ids)}")
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, (vocab_size,) int64; special tokens count 0 (bits per byte)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        symbols = {ch: 1 for ch in byte_symbols()}
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token not in special:
                out[i] = sum(symbols.get(ch, 0) for ch in token)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


_BYTE_VOCAB = {symbol: b for b, symbol in enumerate(byte_symbols())}


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / FILE
