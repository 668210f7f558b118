"""Preparing token data: stream a source, split by document, fit or load a tokenizer, write checksummed shards.

The source is read as a stream: each document's split is decided as it passes (a hash of its name), the text
is encoded in worker processes a few batches ahead of the writer, and the tokens go straight into shard
files, so memory does not grow with the source. A BPE is fitted first, on a bounded sample of the train
documents (a separate, shorter read of the start of the source).

The output folder holds `train_000.bin`…, `val_000.bin`… (raw little-endian token arrays, memmap-able),
`train_documents.jsonl` and `val_documents.jsonl` (each document's name and token count, in order),
`tokenizer.json` and `manifest.json`; it is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from looped.data.encode import default_workers, encode_documents
from looped.data.errors import DataError
from looped.data.sources import Document, InvalidUTF8, iter_documents
from looped.data.tokenizer import EOT, Tokenizer

FORMAT, VERSION, MANIFEST = "looped-tokens", 1, "manifest.json"
SPLITS = ("train", "val")
BYTES_SEPARATOR = "\n\n"
# The BPE is fitted on at most this many characters of train text (the first train documents of the source).
BPE_SAMPLE = 100_000_000
# A single-document source is cut into ~PIECES pieces, none much over PIECE_CHARS, at blank lines.
PIECES, PIECE_CHARS = 64, 64 * 1024
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_LINE_END = re.compile(r"\n")


def prepare(
    source: str | Path,
    out: str | Path,
    tokenizer: str | Path = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    shard_tokens: int = 16_777_216,
    text_field: str = "text",
    invalid_utf8: InvalidUTF8 = "replace",
    seed: int = 0,
    workers: int | None = None,
    bpe_sample: int = BPE_SAMPLE,
    progress: bool = True,
    warn: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a source into a token dataset folder that `TokenData.open` reads, streaming it.

    Args:
        source: Anything `iter_documents` reads: "shakespeare", a file or folder, `hf:NAME[:CONFIG][@SPLIT]`.
        out: The folder to create; it must be absent or empty unless `overwrite`.
        tokenizer: "bpe" (fitted on train documents only), "bytes" (256 ids, no fitting), or the path of a
            tokenizer.json (or a folder with one) to use as it is.
        vocab_size: The BPE vocabulary, end-of-text included; used only for "bpe".
        val_fraction: The expected share of documents held out for validation, in (0, 1).
        shard_tokens: Tokens per shard file (the last shard of a split holds the rest).
        text_field: The field or column with the text in .jsonl, .parquet and hf: sources.
        invalid_utf8: "replace", "skip" or "error" for text that is not valid UTF-8 (see `iter_documents`).
        seed: Decides, with each document's name, which documents are held out.
        workers: Processes that encode BPE (default: every core this process may use). The output does not
            depend on it. They are started with "spawn", which imports the caller's main module again: a
            script that calls `prepare` needs the `if __name__ == "__main__":` guard.
        bpe_sample: The most characters of train text the BPE is fitted on (the first train documents).
        progress: Show progress bars.
        warn: Receives one-line warnings (invalid UTF-8).
        overwrite: Replace an existing prepared dataset at `out`.

    Returns:
        The manifest also written to `out/manifest.json`.

    Raises:
        DataError: Bad arguments, an unreadable or empty source, or an `out` that may not be replaced.
    """
    _check_arguments(tokenizer, val_fraction, shard_tokens, seed, workers, bpe_sample)
    out = Path(out)
    _check_out(out, overwrite)
    warn = _quiet_bars(warn) if progress else warn

    def read(warn: Callable[[str], None]) -> tuple[Iterator[Document], dict[str, Any] | None]:
        return _documents(source, text_field, invalid_utf8, warn)

    # The fitting read is quiet: what it meets is reported once, by the read that writes.
    tok, sample = _tokenizer(
        tokenizer, vocab_size, lambda: read(lambda _: None)[0], bpe_sample, progress, seed, val_fraction
    )
    docs, pieces = read(warn)
    about = {
        "source": str(source),
        "text_field": text_field,
        "seed": seed,
        "val_fraction": val_fraction,
        "invalid_utf8": invalid_utf8,
        "pieces": pieces,
        "bpe_sample": sample,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        split = split_stream(docs, val_fraction, seed)
        manifest = _write_dataset(
            tmp, tok, split, workers or default_workers(), shard_tokens, about, progress
        )
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_arguments(
    tokenizer: str | Path, val_fraction: float, shard_tokens: int, seed: int, workers: int | None, sample: int
) -> None:
    if str(tokenizer) not in ("bpe", "bytes") and not Path(tokenizer).exists():
        raise DataError(
            f"tokenizer must be 'bpe', 'bytes' or a tokenizer.json (or a folder with one), got {str(tokenizer)!r}"
        )
    if not 0 < val_fraction < 1:
        raise DataError(
            f"val_fraction must be in (0, 1): both splits get at least one document; got {val_fraction}"
        )
    if shard_tokens < 1 or seed < 0:
        raise DataError(f"shard_tokens must be ≥ 1 and seed ≥ 0, got {shard_tokens} and {seed}")
    if (workers is not None and workers < 1) or sample < 1:
        raise DataError(f"workers and bpe_sample must be ≥ 1, got {workers} and {sample}")


def _documents(
    source: str | Path, text_field: str, invalid_utf8: InvalidUTF8, warn: Callable[[str], None]
) -> tuple[Iterator[Document], dict[str, Any] | None]:
    """The non-empty documents of `source` as a stream, and how the only document was cut (None if not)."""
    docs = (d for d in iter_documents(source, text_field, invalid_utf8, warn) if d.text)
    first = list(itertools.islice(docs, 2))
    if not first:
        raise DataError(f"{source}: no text (no documents, or only empty ones)")
    if len(first) > 1:
        return itertools.chain(first, docs), None
    # One document (a single .txt file) cannot be split by document until it is cut into pieces.
    pieces = cut_document(first[0])
    about = {"document": first[0].name, "count": len(pieces), "note": "the only document, cut at blank lines"}
    return iter(pieces), about


def _tokenizer(
    kind: str | Path,
    vocab_size: int,
    read: Callable[[], Iterator[Document]],
    sample: int,
    progress: bool,
    seed: int,
    val_fraction: float,
) -> tuple[Tokenizer, dict[str, int] | None]:
    """The bytes tokenizer, a given one, or a BPE fitted on a sample of the train documents (and its size)."""
    if str(kind) == "bytes":
        return Tokenizer.bytes(), None
    if str(kind) != "bpe":
        return Tokenizer.load(kind), None
    seen = {"documents": 0, "characters": 0, "limit": sample}
    # This read of the source is left as soon as the sample is full: memory stays bounded by the trainer's
    # word counts, and the train/val decision is the one the writing read makes. It starts here, before any
    # progress bar, so that a missing or empty source is a one-line error.
    docs = split_stream(read(), val_fraction, seed)

    def texts() -> Iterator[str]:
        with tqdm(total=sample, desc="BPE input", unit="char", unit_scale=True, disable=not progress) as bar:
            for doc, split in docs:
                if split != "train":
                    continue
                text = doc.text[: sample - seen["characters"]]
                seen["documents"] += 1
                seen["characters"] += len(text)
                bar.update(len(text))
                yield text
                if seen["characters"] >= sample:
                    return

    return Tokenizer.train_bpe(texts(), vocab_size, progress=progress), seen


def _write_dataset(
    folder: Path,
    tok: Tokenizer,
    docs: Iterable[tuple[Document, str]],
    workers: int,
    shard_tokens: int,
    about: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Encode (document, split) pairs into each split's shards; write the tokenizer and the manifest."""
    dtype = token_dtype(tok.vocab_size)
    # The end-of-text token separates documents; the bytes tokenizer has none, so a blank line does.
    sep = [tok.eot_id] if tok.eot_id is not None else list(BYTES_SEPARATOR.encode())
    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens, np.asarray(sep, dtype)) for s in SPLITS}
    items = (((split, doc.name, len(doc.text)), doc.text) for doc, split in docs)
    try:
        with tqdm(desc="tokenizing", unit="char", unit_scale=True, disable=not progress) as bar:
            for (split, name, chars), ids in encode_documents(items, tok, dtype, workers):
                writers[split].add(name, ids)
                bar.update(chars)
    finally:
        shards = [shard for w in writers.values() for shard in w.close()]
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
        "bpe_sample": about["bpe_sample"],
        "documents": {s: {"count": w.documents, "file": w.names_file} for s, w in writers.items()},
        "tokens": {s: w.total for s, w in writers.items()},
        "shards": shards,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token type: little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def split_stream(docs: Iterable[Document], val_fraction: float, seed: int) -> Iterator[tuple[Document, str]]:
    """(document, "train" or "val") for each document, in order, decided as the stream passes.

    A document is held out when a hash of (seed, name) falls below `val_fraction`, so its split depends on
    nothing else. The last document alone waits for the end of the stream: if every other document went to
    one split, it goes to the other, so that neither is empty (given at least two documents).
    """
    counts = dict.fromkeys(SPLITS, 0)
    previous: tuple[Document, str] | None = None
    for doc in docs:
        if previous is not None:
            counts[previous[1]] += 1
            yield previous
        previous = (doc, "val" if _unit_hash(seed, doc.name) < val_fraction else "train")
    if previous is None:
        return
    doc, split = previous
    other = "train" if split == "val" else "val"
    yield doc, other if counts[other] == 0 else split


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by `split_stream`, keeping source order; needs two documents."""
    if len(docs) < 2:
        raise DataError("a train/val split by document needs at least two documents")
    pairs = list(split_stream(docs, val_fraction, seed))
    return [d for d, s in pairs if s == "train"], [d for d, s in pairs if s == "val"]


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


class _ShardWriter:
    """Writes one split: documents joined by `separator` into `{split}_000.bin`… of `shard_tokens` each
    (hashing as it goes), and each document's name and token count into `{split}_documents.jsonl`."""

    def __init__(
        self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, separator: np.ndarray
    ) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.separator = separator
        self.shards: list[dict[str, Any]] = []
        self.total = self.documents = 0
        self.names_file = f"{split}_documents.jsonl"
        self._names = open(folder / self.names_file, "w", encoding="ascii")
        self._file = None

    def add(self, name: str, ids: np.ndarray) -> None:
        """Append one document's ids (after the separator, unless it is the split's first)."""
        if self.documents:
            self._write(self.separator)
        self._write(ids)
        self._names.write(json.dumps({"name": name, "tokens": len(ids)}) + "\n")
        self.documents += 1

    def _write(self, ids: np.ndarray) -> None:
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
        """Close the open files; returns one {file, split, tokens, sha256} per shard written."""
        self._names.close()
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
