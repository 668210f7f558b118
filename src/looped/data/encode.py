"""Encoding a stream of documents into token arrays, in worker processes, in source order, with bounded memory.

Documents are gathered into batches of about BATCH_CHARS characters; at most two batches per worker are in
flight, so memory does not grow with the source. Workers return one numpy array per batch (not Python lists
of ints), and the results come back in submission order, so the output does not depend on the number of
workers. A document longer than SEGMENT_CHARS is encoded in segments, cut where the byte-level
pre-tokenizer splits anyway, which gives the same ids as encoding it whole.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from looped.data.tokenizer import Tokenizer

BATCH_CHARS = 1 << 20
SEGMENT_CHARS = 1 << 20
# Batches in flight per worker: one being encoded and one waiting, so a worker never idles for the parent.
IN_FLIGHT_PER_WORKER = 2
PARENT_CHECK_SECONDS = 1.0
# Before a space that follows a word character. No pre-token of the GPT-2 split pattern (which the ByteLevel
# pre-tokenizer uses) contains a non-space character followed by a space, so a pre-token always starts
# there, and encoding the text on either side separately gives the same ids.
_CUT = re.compile(r"\w(?= )")

Key = TypeVar("Key")
Batch = tuple[list[tuple[Any, bool]], list[str]]  # (owner key and "last segment" per text, texts)


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def segments(text: str, size: int = SEGMENT_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters (more where no safe cut is near) that encode alike."""
    parts, start = [], 0
    while len(text) - start > size:
        match = _CUT.search(text, start + size - 1)
        if match is None:
            break
        parts.append(text[start : match.end()])
        start = match.end()
    parts.append(text[start:])
    return parts


def encode_documents(
    docs: Iterable[tuple[Key, str]],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    workers: int,
) -> Iterator[tuple[Key, np.ndarray]]:
    """(key, token ids) for each (key, text) of `docs`, in order; `docs` is read only a few batches ahead.

    BPE is encoded in `workers` processes, one thread each. Bytes are encoded here: that is a copy, cheaper
    than sending the text to another process.
    """
    batches = _batches(docs, BATCH_CHARS, SEGMENT_CHARS)
    if tokenizer.kind == "bytes":
        results = ((owners, encode_texts(tokenizer, dtype, texts)) for owners, texts in batches)
    else:
        results = _in_workers(batches, tokenizer, dtype, workers)
    parts: list[np.ndarray] = []
    for owners, (tokens, lengths) in results:
        for (key, last), ids in zip(owners, np.split(tokens, np.cumsum(lengths)[:-1]), strict=True):
            parts.append(ids)
            if last:
                yield key, parts[0] if len(parts) == 1 else np.concatenate(parts)
                parts = []


def _batches(docs: Iterable[tuple[Any, str]], batch_chars: int, segment_chars: int) -> Iterator[Batch]:
    owners: list[tuple[Any, bool]] = []
    texts: list[str] = []
    size = 0
    for key, text in docs:
        pieces = segments(text, segment_chars)
        for i, piece in enumerate(pieces):
            owners.append((key, i == len(pieces) - 1))
            texts.append(piece)
            size += len(piece)
            if size >= batch_chars:
                yield owners, texts
                owners, texts, size = [], [], 0
    if texts:
        yield owners, texts


def encode_texts(tokenizer: Tokenizer, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ids of all `texts` back to back, and how many belong to each text."""
    if tokenizer.kind == "bytes":
        arrays = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        encoded = tokenizer.hf.encode_batch_fast(texts, add_special_tokens=False)
        arrays = [np.array(e.ids, dtype=dtype) for e in encoded]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)
    return tokens, lengths


def _in_workers(
    batches: Iterator[Batch], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[tuple[list[tuple[Any, bool]], tuple[np.ndarray, np.ndarray]]]:
    """Each batch's (owners, encoded) in order, encoded by a pool of `workers` processes."""
    # spawn, not fork: a forked child of a process whose tokenizers already ran threads (the BPE trainer) may
    # deadlock, and a fresh interpreter that imports only numpy and tokenizers is small.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(tokenizer.hf.to_str(), dtype.str, os.getpid()),
    )
    pending: deque = deque()
    try:
        for owners, texts in batches:
            pending.append((owners, pool.submit(_encode_in_worker, texts)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                owners, future = pending.popleft()
                yield owners, future.result()
        while pending:
            owners, future = pending.popleft()
            yield owners, future.result()
    finally:
        # On an error or Ctrl-C in the parent: drop the queued batches, wait for the running ones.
        pool.shutdown(wait=True, cancel_futures=True)


_worker: tuple[Tokenizer, np.dtype] | None = None


def _start_worker(tokenizer_json: str, dtype: str, parent: int) -> None:
    global _worker
    # Ctrl-C reaches the whole process group; the parent alone handles it (and shuts the pool down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = (Tokenizer(HFTokenizer.from_str(tokenizer_json)), np.dtype(dtype))
    # A worker holds both ends of its task queue, so it would wait forever for a parent that was killed.
    # (The parent's pid comes from the parent: it may have died before this runs.)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None, "the pool's initializer did not run"
    return encode_texts(*_worker, texts)
