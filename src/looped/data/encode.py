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
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from looped.data.errors import DataError
from looped.data.tokenizer import Tokenizer

BATCH_CHARS = 1 << 18
SEGMENT_CHARS = 1 << 18
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
    """Each batch's (owners, encoded) in order; batch i is encoded by worker i % workers."""
    pool = _Pool(workers, tokenizer, dtype)
    pending: deque = deque()
    sent = received = 0
    finished = False
    try:
        for owners, texts in batches:
            pool.send(sent, texts)
            pending.append(owners)
            sent += 1
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft(), pool.receive(received)
                received += 1
        while pending:
            yield pending.popleft(), pool.receive(received)
            received += 1
        finished = True
    finally:
        # On an error, Ctrl-C or a consumer that stops early, the workers are stopped at once.
        pool.close(abort=not finished)


class _Pool:
    """Worker processes, each with its own task queue and result pipe.

    Not `concurrent.futures.ProcessPoolExecutor`: when one of its workers dies while its task queue is full,
    the parent can wait forever (Python 3.11); here a dead worker closes its pipe, and `receive` says so.
    """

    def __init__(self, workers: int, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        # spawn, not fork: a forked child of a process whose tokenizers already ran threads (the BPE trainer)
        # may deadlock, and a fresh interpreter that imports only numpy and tokenizers is small.
        context = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.tasks: list[Any] = []
        self.results: list[Any] = []
        args = (tokenizer.hf.to_str(), dtype.str, os.getpid())
        try:
            for _ in range(workers):
                tasks = context.Queue()  # put() does not block: a feeder thread writes to the pipe
                reader, writer = context.Pipe(duplex=False)
                proc = context.Process(
                    target=_work, args=(tasks, writer, *args), name="looped-encode", daemon=True
                )
                proc.start()
                writer.close()  # the worker holds the only writing end, so its exit reads as end of file
                self.procs.append(proc)
                self.tasks.append(tasks)
                self.results.append(reader)
        except BaseException:
            self.close(abort=True)
            raise

    def send(self, index: int, texts: list[str]) -> None:
        self.tasks[index % len(self.procs)].put(texts)

    def receive(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        k = index % len(self.procs)
        try:
            error, result = self.results[k].recv()
        except EOFError:
            self.procs[k].join(1)
            raise DataError(
                f"an encoding worker stopped (exit code {self.procs[k].exitcode}; its error, if any, is above)"
            ) from None
        if error is not None:
            raise DataError(f"an encoding worker failed: {error}")
        return result

    def close(self, abort: bool) -> None:
        for proc, tasks in zip(self.procs, self.tasks, strict=True):
            if abort:
                proc.terminate()
                tasks.cancel_join_thread()  # do not wait to deliver batches nobody will read
            else:
                tasks.put(None)
            tasks.close()
        for proc in self.procs:
            proc.join()
        for reader in self.results:
            reader.close()


def _work(tasks: Any, results: Any, tokenizer_json: str, dtype: str, parent: int) -> None:
    """A worker's life: encode each batch from `tasks` and send (error, result) back, until None."""
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A worker holds both ends of its task queue, so it would wait forever for a parent that was killed.
    # (The parent's pid comes from the parent: it may have died before this runs.)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json))
    while (texts := tasks.get()) is not None:
        try:
            results.send((None, encode_texts(tokenizer, np.dtype(dtype), texts)))
        except Exception as e:
            results.send((f"{type(e).__name__}: {e}", None))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)
