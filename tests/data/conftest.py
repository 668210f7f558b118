"""Fixtures for the data tests: tiny corpora written into tmp folders and a small prepared dataset."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from looped.data import prepare

# Non-ASCII on purpose: two-, three- and four-byte UTF-8 sequences, and a CRLF line end.
SAMPLE = "Ça va? Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂🚀.\r\nNext line.\n"


def random_text(seed: int, n_words: int) -> str:
    """Deterministic prose-like text: random words, spaces, line ends and blank lines."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
        for _ in range(n_words)
    ]
    out = []
    for i, word in enumerate(words):
        out.append(word)
        out.append(rng.choice([" "] * 8 + ["\n", "\n\n"]) if i < n_words - 1 else "\n")
    return "".join(out)


@pytest.fixture
def make_corpus(tmp_path: Path) -> Callable[..., Path]:
    """Returns a function that writes `n` .txt documents (random text plus SAMPLE) into a fresh folder."""

    def make(n: int = 12, words: int = 120, name: str = "corpus") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n):
            (folder / f"doc_{i:02d}.txt").write_text(
                random_text(i, words) + SAMPLE, encoding="utf-8", newline=""
            )
        return folder

    return make


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bytes-tokenizer dataset of 8 random documents in train shards of 3000 tokens (several shards)."""
    root = tmp_path_factory.mktemp("prepared")
    src = root / "src"
    src.mkdir()
    for i in range(8):
        (src / f"d{i}.txt").write_text(random_text(100 + i, 400), encoding="utf-8")
    prepare(src, root / "data", tokenizer="bytes", val_fraction=0.25, shard_tokens=3000, progress=False)
    return root / "data"
