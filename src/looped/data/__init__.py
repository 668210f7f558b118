"""Data: documents from a source, tokenizers, prepared token shards, and the resumable training loader.

Public API: `iter_documents`, `Document`, `Tokenizer`, `prepare`, `TokenData`, `Loader`, `val_windows`,
`DataError`.
"""

from looped.data.errors import DataError
from looped.data.loader import Loader, TokenData, val_windows
from looped.data.prepare import prepare
from looped.data.sources import Document, iter_documents
from looped.data.tokenizer import EOT, Tokenizer

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
