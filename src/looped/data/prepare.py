"""Preparing token data: read a source, split by document, fit a tokenizer on train, write checksummed shards.

The output folder holds `train_000.bin`…, `val_000.bin`… (raw little-endian token arrays, memmap-able),
`tokenizer.json` and `manifest.json`; it is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from looped.data.errors import DataError
from looped.data.sources import Document, InvalidUTF8, iter_documents
from looped.data.tokenizer import EOT, Tokenizer

FORMAT, VERSION, MANIFEST = "looped-tokens", 1, "manifest.json"
BYTES_SEPARATOR = "\n\n"
# A single-document source is cut into ~PIECES pieces, none much over PIECE_CHARS, at blank lines.
PIECES, PIECE_CHARS = 64, 64 * 1024
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_LINE_END = re.compile(r"\n")
# Documents are encoded in parallel batches of about this many characters.
_BATCH_CHARS = 2 * 1024 * 1024


def prepare(
    source: str | Path,
    out: str | Path,
    tokenizer: Literal["bpe", "bytes"] = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    shard_tokens: int = 16_777_216,
    text_field: str = "text",
    invalid_utf8: InvalidUTF8 = "replace",
    seed: int = 0,
    progress: bool = True,
    warn: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a source into a token dataset folder that `TokenData.open` reads.

    Args:
        source: Anything `iter_documents` reads: "shakespeare", a file or folder, `hf:NAME[:CONFIG]`.
        out: The folder to create; it must be absent or empty unless `overwrite`.
        tokenizer: "bpe" (trained on the train documents only) or "bytes" (256 ids, no training).
        vocab_size: The BPE vocabulary, end-of-text included; ignored for "bytes".
        val_fraction: The expected share of documents held out for validation, in (0, 1).
        shard_tokens: Tokens per shard file (the last shard of a split holds the rest).
        text_field: The field or column with the text in .jsonl, .parquet and hf: sources.
        invalid_utf8: "replace", "skip" or "error" for text that is not valid UTF-8 (see `iter_documents`).
        seed: Decides, with each document's name, which documents are held out.
        progress: Show progress bars.
        warn: Receives one-line warnings (invalid UTF-8).
        overwrite: Replace an existing prepared dataset at `out`.

    Returns:
        The manifest also written to `out/manifest.json`.

    Raises:
        DataError: Bad arguments, an unreadable or empty source, or an `out` that may not be replaced.
    """
    _check_arguments(tokenizer, val_fraction, shard_tokens, seed)
    out = Path(out)
    _check_out(out, overwrite)

    warn = _quiet_bars(warn) if progress else warn
    docs, pieces = _read_documents(source, text_field, invalid_utf8, warn, progress)
    train, val = split_documents(docs, val_fraction, seed)
    tok = _fit_tokenizer(tokenizer, train, vocab_size, progress)
    about = {
        "source": str(source),
        "text_field": text_field,
        "seed": seed,
        "val_fraction": val_fraction,
        "invalid_utf8": invalid_utf8,
        "pieces": pieces,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write_dataset(tmp, tok, {"train": train, "val": val}, shard_tokens, about, progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_arguments(tokenizer: str, val_fraction: float, shard_tokens: int, seed: int) -> None:
    if tokenizer not in ("bpe", "bytes"):
        raise DataError(f"tokenizer must be 'bpe' or 'bytes', got {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise DataError(
            f"val_fraction must be in (0, 1): both splits get at least one document; got {val_fraction}"
        )
    if shard_tokens < 1 or seed < 0:
        raise DataError(f"shard_tokens must be ≥ 1 and seed ≥ 0, got {shard_tokens} and {seed}")


def _read_documents(
    source: str | Path,
    text_field: str,
    invalid_utf8: InvalidUTF8,
    warn: Callable[[str], None],
    progress: bool,
) -> tuple[list[Document], dict[str, Any] | None]:
    """The non-empty documents of `source`, and how the only document was cut into pieces (None if not)."""
    docs = iter_documents(source, text_field, invalid_utf8, warn)
    docs = [d for d in tqdm(docs, desc="reading", unit="doc", disable=not progress) if d.text]
    if not docs:
        raise DataError(f"{source}: no text (no documents, or only empty ones)")
    if len(docs) > 1:
        return docs, None
    # One document (a single .txt file) cannot be split by document until it is cut into pieces.
    name, docs = docs[0].name, cut_document(docs[0])
    return docs, {"document": name, "count": len(docs), "note": "the only document, cut at blank lines"}


def _fit_tokenizer(kind: str, train: list[Document], vocab_size: int, progress: bool) -> Tokenizer:
    """A BPE tokenizer trained on the train documents only, or the bytes tokenizer."""
    if kind == "bytes":
        return Tokenizer.bytes()
    texts = tqdm(
        (d.text for d in train), desc="BPE input", unit="doc", total=len(train), disable=not progress
    )
    return Tokenizer.train_bpe(texts, vocab_size, progress=progress)


def _write_dataset(
    folder: Path,
    tok: Tokenizer,
    splits: dict[str, list[Document]],
    shard_tokens: int,
    about: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Write each split's shards, the tokenizer and the manifest into `folder`; returns the manifest."""
    dtype = token_dtype(tok.vocab_size)
    shards, tokens = [], {}
    for split, docs in splits.items():
        writer = _ShardWriter(folder, split, dtype, shard_tokens)
        _write_split(tok, docs, writer, progress)
        shards += writer.close()
        tokens[split] = writer.total
    tok.save(folder)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": about["source"],
        "text_field": about["text_field"],
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "separator": EOT if tok.eot_id is not None else BYTES_SEPARATOR,
        "dtype": dtype.name,
        "byteorder": "little",
        "seed": about["seed"],
        "val_fraction": about["val_fraction"],
        "invalid_utf8": about["invalid_utf8"],
        "pieces": about["pieces"],
        "documents": {s: {"count": len(d), "names": [x.name for x in d]} for s, d in splits.items()},
        "tokens": tokens,
        "shards": shards,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token type: little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val), keeping source order; needs at least two documents.

    A document is held out when a hash of (seed, name) falls below `val_fraction`, so its split does not
    depend on the other documents; if that leaves a split empty, the document nearest the threshold moves
    over.
    """
    if len(docs) < 2:
        raise DataError("a train/val split by document needs at least two documents")
    scores = [_unit_hash(seed, d.name) for d in docs]
    held = {i for i, s in enumerate(scores) if s < val_fraction}
    if not held:
        held = {min(range(len(docs)), key=scores.__getitem__)}
    if len(held) == len(docs):
        held.remove(max(range(len(docs)), key=scores.__getitem__))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _unit_hash(seed: int, name: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def cut_document(doc: Document, pieces: int = PIECES, max_chars: int = PIECE_CHARS) -> list[Document]:
    """Cut one document into about `pieces` consecutive pieces of at most ~`max_chars`, named `name#0000`…

    Cuts fall after blank lines, else after line ends, else every N characters; the pieces concatenate back
    to the document exactly.
    """
    text = doc.text
    target = max(1, min(max_chars, math.ceil(len(text) / pieces)))
    for boundary in (_BLANK_LINES, _LINE_END):
        parts = _cut_after(text, target, boundary)
        if len(parts) > 1:
            break
    else:
        parts = [text[i : i + target] for i in range(0, len(text), target)]
    if len(parts) < 2:
        raise DataError(
            f"{doc.name}: the only document ({len(text)} characters) is too short to split into train and val"
        )
    return [Document(f"{doc.name}#{i:04d}", part) for i, part in enumerate(parts)]


def _cut_after(text: str, target: int, boundary: re.Pattern[str]) -> list[str]:
    parts, start = [], 0
    while start < len(text):
        match = boundary.search(text, start + target)
        end = match.end() if match else len(text)
        parts.append(text[start:end])
        start = end
    return parts


def _write_split(tok: Tokenizer, docs: list[Document], writer: _ShardWriter, progress: bool) -> None:
    """Encode `docs` in order into `writer`, with the separator between neighbours."""
    # The end-of-text token separates documents; the bytes tokenizer has none, so a blank line does.
    sep = [tok.eot_id] if tok.eot_id is not None else list(BYTES_SEPARATOR.encode())
    separator = np.asarray(sep, writer.dtype)
    with tqdm(total=len(docs), desc=f"tokenizing {writer.split}", unit="doc", disable=not progress) as bar:
        for i, ids in enumerate(_encode(tok, docs, writer.dtype)):
            if i:
                writer.write(separator)
            writer.write(ids)
            bar.update()


def _encode(tok: Tokenizer, docs: list[Document], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays of `docs` in order, encoded in parallel batches."""
    batch: list[str] = []
    size = 0
    for i, doc in enumerate(docs):
        batch.append(doc.text)
        size += len(doc.text)
        if size >= _BATCH_CHARS or i == len(docs) - 1:
            if tok.kind == "bytes":
                yield from (tok.encode_array(t, dtype) for t in batch)
            else:
                yield from (np.asarray(ids, dtype) for ids in tok.encode_batch(batch))
            batch, size = [], 0


class _ShardWriter:
    """Appends tokens to `{split}_000.bin`, `{split}_001.bin`… of `shard_tokens` each, hashing as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.total = 0
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._name = f"{self.split}_{len(self.shards):03d}.bin"
                self._file = open(self.folder / self._name, "wb")
                self._hash, self._count = hashlib.sha256(), 0
            chunk, ids = ids[: self.shard_tokens - self._count], ids[self.shard_tokens - self._count :]
            data = chunk.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(chunk)
            self.total += len(chunk)
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.close()
        self._file = None
        entry = {
            "file": self._name,
            "split": self.split,
            "tokens": self._count,
            "sha256": self._hash.hexdigest(),
        }
        self.shards.append(entry)

    def close(self) -> list[dict[str, Any]]:
        """Close the open shard; returns one {file, split, tokens, sha256} per shard written."""
        if self._file is not None:
            self._finish()
        return self.shards


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    # Only a prepared dataset is ever deleted, never a folder someone pointed at by mistake.
    if not (out / MANIFEST).is_file():
        raise DataError(f"refusing to overwrite {out}: it is not a prepared dataset (no {MANIFEST})")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _quiet_bars(warn: Callable[[str], None]) -> Callable[[str], None]:
    """`warn` that lifts the progress bars out of the way while it prints."""

    def quiet(message: str) -> None:
        with tqdm.external_write_mode():
            warn(message)

    return quiet
