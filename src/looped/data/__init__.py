"""Data: documents from a source, tokenizers, prepared token shards, and the resumable training loader.

Public API: `iter_documents`, `Document`, `Tokenizer`, `prepare`, `TokenData`, `Loader`, `val_windows`,
`DataError`.

The loader's names are imported on first use (PEP 562): `looped data prepare` and its worker processes
must not import torch, which only the loader needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from looped.data.errors import DataError
from looped.data.prepare import prepare
from looped.data.sources import Document, iter_documents
from looped.data.tokenizer import EOT, Tokenizer

# name → the module that defines it
_EXPORTS = {
    "Loader": "looped.data.loader",
    "TokenData": "looped.data.loader",
    "val_windows": "looped.data.loader",
}

__all__ = [
    "EOT",
    "DataError",
    "Document",
    "Loader",
    "TokenData",
    "Tokenizer",
    "iter_documents",
    "prepare",
    "val_windows",
]

if TYPE_CHECKING:
    from looped.data.loader import Loader, TokenData, val_windows


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'looped.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value
