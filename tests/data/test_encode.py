"""encode: segments encode like the whole text, batches come back in order, the worker pool's results match
encoding in this process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, random_text

from looped.data import DataError, Tokenizer
from looped.data import encode as encode_module
from looped.data.encode import encode_documents, encode_texts, segments

# Runs of spaces and tabs, apostrophes (the pattern's contractions), digits, punctuation and non-ASCII words.
TRICKY = "it's  3 o'clock\t\tnow;  naïve  日本 — 42,000 words 🙂  end.\n  indented 'quoted'  x\n"


def tricky_text(seed: int) -> str:
    return "".join(random_text(seed + i, 30) + TRICKY + SAMPLE for i in range(12))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe([tricky_text(100 + i) for i in range(4)], vocab_size=400)


@pytest.mark.parametrize("size", [1, 7, 60, 500])
def test_segments_encode_like_the_whole(bpe: Tokenizer, size: int) -> None:
    text = tricky_text(0)
    parts = segments(text, size)
    assert "".join(parts) == text and len(parts) > 3
    assert all(p[-1].isalnum() or p[-1] == "_" for p in parts[:-1])  # each cut after a word character
    assert all(nxt.startswith(" ") for nxt in parts[1:])  # and before a space
    joined = [i for p in parts for i in bpe.encode(p)]
    assert joined == bpe.encode(text)


def test_segments_without_a_cut_stay_whole() -> None:
    assert segments("x" * 100, 10) == ["x" * 100]
    assert segments("short", 10) == ["short"]


def test_encode_texts_counts_each_text(bpe: Tokenizer) -> None:
    texts = ["first text", TRICKY, "🙂"]
    tokens, lengths = encode_texts(bpe, np.dtype("<u2"), texts)
    assert tokens.dtype == np.dtype("<u2") and lengths.tolist() == [len(bpe.encode(t)) for t in texts]
    assert tokens.tolist() == [i for t in texts for i in bpe.encode(t)]


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_gives_each_document_in_order(
    bpe: Tokenizer, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches and segments: documents span several batches, batches hold several documents.
    monkeypatch.setattr(encode_module, "BATCH_CHARS", 700)
    monkeypatch.setattr(encode_module, "SEGMENT_CHARS", 300)
    docs = [(f"d{i}", tricky_text(i)[: 100 + 97 * i]) for i in range(20)]
    got = list(encode_documents(docs, bpe, np.dtype("<u2"), workers))
    assert [k for k, _ in got] == [k for k, _ in docs]
    for (_, ids), (_, text) in zip(got, docs, strict=True):
        assert ids.dtype == np.dtype("<u2") and ids.tolist() == bpe.encode(text)
    assert not multiprocessing.active_children()  # the pool is shut down


def test_pool_reads_a_bounded_number_of_batches_ahead(
    bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_module, "BATCH_CHARS", 1000)
    read = 0
    ahead = []

    def source():
        nonlocal read
        for i in range(400):
            read += 1
            yield i, random_text(i, 15)[:100].ljust(100)  # 100 characters: 10 documents a batch

    for done, (key, _) in enumerate(encode_documents(source(), bpe, np.dtype("<u2"), 2), start=1):
        assert key == done - 1
        ahead.append(read - done)
    # In flight: 2 batches per worker, the batch being filled and the one handed back: 6 × 10 documents.
    assert max(ahead) <= 60 and read == 400
    assert max(ahead) >= 20  # the workers were given work ahead, so they never wait for the parent


def test_bytes_are_encoded_without_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pool(*args, **kwargs):
        raise AssertionError("no worker pool for bytes")

    monkeypatch.setattr(encode_module, "_in_workers", no_pool)
    got = list(encode_documents([("a", SAMPLE), ("b", "xyz")], Tokenizer.bytes(), np.dtype("<u2"), 4))
    assert [(k, ids.tolist()) for k, ids in got] == [("a", list(SAMPLE.encode())), ("b", list(b"xyz"))]


KILLED_PARENT = """
import importlib, sys, time
encode = importlib.import_module("looped.data.encode")
prepare = importlib.import_module("looped.data.prepare")
encode.BATCH_CHARS = 2000

def endless(*args):
    for i in range(10**9):
        time.sleep(0.01)
        yield prepare.Document(f"d{i}", "word " * 200)

prepare.iter_documents = endless
prepare.prepare("fake", sys.argv[1], tokenizer=sys.argv[2], workers=2, progress=False)
"""


def _workers_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if (
                int(stat.rsplit(")", 1)[1].split()[1]) == parent
                and b"spawn_main" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_exit_when_the_parent_is_killed(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "tok")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT, str(tmp_path / "out"), str(tmp_path / "tok")]
    )
    try:
        deadline = time.monotonic() + 60
        while len(workers := _workers_of(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "orphaned workers still run"
    assert not (tmp_path / "out").exists()  # only the temporary folder is left behind


def test_a_dead_worker_is_an_error_not_a_wait(bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode_module, "BATCH_CHARS", 500)
    stream = encode_documents(((i, "word " * 100) for i in range(10**6)), bpe, np.dtype("<u2"), 2)
    next(stream)
    victim = next(p for p in multiprocessing.active_children() if p.name == "looped-encode")
    os.kill(victim.pid, signal.SIGKILL)  # as the out-of-memory killer would
    with pytest.raises(DataError, match="an encoding worker stopped"):
        for _ in stream:
            pass
    assert not multiprocessing.active_children()
