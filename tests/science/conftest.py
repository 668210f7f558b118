"""A small prepared corpus (bytes tokenizer) for the science tests' many short runs."""

from __future__ import annotations

import pytest
from helpers import write_corpus

from looped.data.prepare import prepare


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("science-data")
    prepare(
        write_corpus(root / "text", documents=6, sentences=60),
        root / "tokens",
        tokenizer="bytes",
        progress=False,
    )
    return root / "tokens"
