"""Prepared token data: `TokenData` (checked, memmapped shards), the resumable `Loader`, and `val_windows`.

A split is cut into windows of seq_len + 1 tokens at stride seq_len (inputs and labels shifted by one), never
crossing a shard boundary. Training reads them in a per-epoch permutation as one global stream that every
rank indexes the same way, so the run's batches depend on (seed, seq_len, global batch) and not on how the
global batch is divided among processes and accumulation steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looped.data.errors import DataError
from looped.data.prepare import FORMAT, MANIFEST, VERSION
from looped.data.tokenizer import Tokenizer

STATE_VERSION = 1


@dataclass(repr=False)
class TokenData:
    """A prepared dataset folder: its manifest, tokenizer and read-only memmapped shards per split."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    shards: dict[str, list[np.memmap]]

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> TokenData:
        """Open a folder written by `prepare`, checking every shard's size and (if `verify`) its sha256.

        Raises:
            DataError: The folder or manifest is missing, or a shard is missing, truncated or corrupted.
        """
        path = Path(path)
        hint = f"run `looped data prepare SOURCE {path}` first"
        if not (path / MANIFEST).is_file():
            where = "no such folder" if not path.is_dir() else f"no {MANIFEST} in it"
            raise DataError(f"no prepared data at {path} ({where}); {hint}")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path / MANIFEST}: not valid JSON ({e}); {hint}") from None
        if not isinstance(manifest, dict):
            manifest = {}
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            found = f"{manifest.get('format')!r} version {manifest.get('version')!r}"
            raise DataError(
                f"{path / MANIFEST}: format {found}, expected {FORMAT!r} version {VERSION}; {hint}"
            )
        shards: dict[str, list[np.memmap]] = {"train": [], "val": []}
        try:
            dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            for entry in manifest["shards"]:
                shards.setdefault(entry["split"], []).append(_open_shard(path, entry, dtype, verify))
        except (KeyError, TypeError) as e:
            raise DataError(f"{path / MANIFEST}: malformed ({type(e).__name__}: {e}); {hint}") from None
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size != manifest["vocab_size"]:
            raise DataError(
                f"{path}: tokenizer.json has {tokenizer.vocab_size} ids, "
                f"the manifest says {manifest['vocab_size']}"
            )
        return cls(path, manifest, tokenizer, shards)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.tokens(s)}" for s in self.shards)
        return f"TokenData({str(self.path)!r}, {self.tokenizer.kind}, vocab_size={self.tokenizer.vocab_size}, {counts})"

    def tokens(self, split: str = "train") -> int:
        """The number of tokens in a split."""
        return sum(len(s) for s in self.shards.get(split, []))

    def fingerprint(self, split: str = "train") -> str:
        """A short digest of the split's shard checksums: the same data gives the same fingerprint."""
        sums = [e["sha256"] for e in self.manifest["shards"] if e["split"] == split]
        return hashlib.sha256("".join(sums).encode()).hexdigest()[:16]


def _open_shard(folder: Path, entry: dict[str, Any], dtype: np.dtype, verify: bool) -> np.memmap:
    file, tokens = folder / entry["file"], entry["tokens"]
    if not file.is_file():
        raise DataError(f"shard {entry['file']} is missing from {folder}; prepare the data again")
    size, expected = file.stat().st_size, tokens * dtype.itemsize
    if size != expected:
        raise DataError(
            f"shard {entry['file']} has {size} bytes, the manifest says {tokens} tokens × {dtype.itemsize} = "
            f"{expected} (truncated or overwritten); prepare the data again"
        )
    if verify:
        with file.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise DataError(
                f"shard {entry['file']} does not match its sha256 in the manifest (corrupted); prepare again"
            )
    return np.memmap(file, dtype=dtype, mode="r", shape=(tokens,))


def _windows(shard: np.ndarray, seq_len: int) -> np.ndarray:
    """The shard's windows as a view (n, seq_len + 1): window k starts at token k * seq_len."""
    if len(shard) <= seq_len:
        return np.empty((0, seq_len + 1), dtype=shard.dtype)
    return np.lib.stride_tricks.sliding_window_view(shard, seq_len + 1)[::seq_len]


class Loader:
    """Deterministic, rank-sharded, resumable training batches.

    Global step s takes the next G = world_size * accum * micro_batch windows of the stream (epoch 0's
    permutation of all windows, then epoch 1's, …). Rank r's micro-batch i is the step's global micro-batch
    g = r * accum + i: its windows [g * micro_batch, (g + 1) * micro_batch). One process with accum=2
    therefore sees exactly what two processes with accum=1 see together.
    """

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        micro_batch: int,
        accum: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if min(seq_len, micro_batch, accum, world_size) < 1:
            raise DataError(
                "seq_len, micro_batch, accum and world_size must be ≥ 1, "
                f"got {seq_len}, {micro_batch}, {accum}, {world_size}"
            )
        if not 0 <= rank < world_size or seed < 0:
            raise DataError(
                f"need 0 ≤ rank < world_size and seed ≥ 0, "
                f"got rank {rank}, world_size {world_size}, seed {seed}"
            )
        self.data, self.split, self.seed, self.seq_len = data, split, seed, seq_len
        self.micro_batch, self.accum, self.rank, self.world_size = micro_batch, accum, rank, world_size
        self._windows = [_windows(s, seq_len) for s in data.shards.get(split, [])]
        # _first[k] is the global index of shard k's first window.
        self._first = np.cumsum([0] + [len(w) for w in self._windows])
        self.num_windows = int(self._first[-1])
        self.global_batch = world_size * accum * micro_batch
        if self.num_windows < self.global_batch:
            raise DataError(
                f"the {split} split has {data.tokens(split)} tokens, {self.num_windows} windows of "
                f"seq_len + 1 = {seq_len + 1}; one step needs {self.global_batch} windows "
                f"(world_size × accum × micro_batch), about {self.global_batch * seq_len + 1} tokens: "
                "use more data, a smaller batch or a shorter seq_len"
            )
        self._position = 0  # windows of the stream consumed by all ranks together
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next window comes from."""
        return self._position // self.num_windows

    @property
    def step(self) -> int:
        """Steps taken so far (by every rank alike)."""
        return self._position // self.global_batch

    @property
    def tokens_per_step(self) -> int:
        """Input tokens in one global step, all ranks and micro-batches together."""
        return self.global_batch * self.seq_len

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # A step needs at most two epochs (it may cross one boundary); keep only the latest few.
            while len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            # PCG64 seeded from (seed, epoch) via SeedSequence: the same permutation on every machine.
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._orders[epoch]

    def _window(self, index: int) -> np.ndarray:
        epoch, offset = divmod(index, self.num_windows)
        w = int(self._order(epoch)[offset])
        shard = int(np.searchsorted(self._first, w, side="right")) - 1
        return self._windows[shard][w - self._first[shard]]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `accum` (inputs, labels) pairs of the next step, each (micro_batch, seq_len)."""
        start = self._position
        batches = []
        for i in range(self.accum):
            first = start + (self.rank * self.accum + i) * self.micro_batch
            rows = np.stack([self._window(q) for q in range(first, first + self.micro_batch)])
            x = torch.from_numpy(rows.astype(np.int64))  # (micro_batch, seq_len + 1)
            batches.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
        self._position += self.global_batch
        return batches

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream and what it depends on; JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "windows_consumed": self._position,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "num_windows": self.num_windows,
            "split": self.split,
            "data": self.data.fingerprint(self.split),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` left off: the next step is the one an uninterrupted loader would give.

        Raises:
            DataError: The state is from another seq_len, global batch, seed, split or data (each named).
        """
        mine = self.state_dict()
        keys = ("seq_len", "global_batch", "seed", "split", "num_windows", "data")
        changed = [f"{k} {state.get(k)!r} → {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if changed:
            raise DataError("cannot resume the loader, its settings or data changed: " + ", ".join(changed))
        position = state.get("windows_consumed")
        if not isinstance(position, int) or position < 0 or position % self.global_batch:
            raise DataError(f"loader state has a bad windows_consumed: {position!r}")
        self._position = position


def val_windows(data: TokenData, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The validation split as consecutive windows, in order: a LongTensor (N, seq_len + 1).

    Window k of a shard holds tokens [k * seq_len, (k + 1) * seq_len], so every token after a shard's first is
    a label exactly once. `max_windows` keeps the first ones.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be ≥ 1, got {seq_len}")
    left = max_windows if max_windows is not None else float("inf")
    parts = [np.empty((0, seq_len + 1), dtype=np.int64)]
    for shard in data.shards.get("val", []):
        windows = _windows(shard, seq_len)[: max(0, min(left, len(shard)))]
        parts.append(windows.astype(np.int64))  # copies only the windows kept, out of the memmap
        left -= len(windows)
    rows = np.concatenate(parts)
    if len(rows) == 0 and max_windows != 0:
        raise DataError(
            f"the val split has {data.tokens('val')} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return torch.from_numpy(rows)
