"""TokenData checks and the Loader: determinism, coverage per epoch, ranks vs accumulation, exact resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from looped.data import DataError, Loader, TokenData, val_windows

SEQ = 16


def shard_arrays(path: Path, split: str) -> list[np.ndarray]:
    """A split's shards read with np.fromfile: the reference, independent of TokenData's memmaps."""
    manifest = json.loads((path / "manifest.json").read_text())
    return [np.fromfile(path / s["file"], dtype="<u2") for s in manifest["shards"] if s["split"] == split]


def reference_windows(path: Path, split: str, seq_len: int) -> list[tuple[int, ...]]:
    """Every window of seq_len + 1 tokens at stride seq_len inside each shard, by plain slicing."""
    out = []
    for shard in shard_arrays(path, split):
        start = 0
        while start + seq_len + 1 <= len(shard):
            out.append(tuple(shard[start : start + seq_len + 1].tolist()))
            start += seq_len
    return out


def rows(step: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, ...]]:
    """The windows of a step's micro-batches, in order, rebuilt from (inputs, labels)."""
    out = []
    for inputs, labels in step:
        assert inputs.dtype == labels.dtype == torch.long
        assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
        out += [tuple(r) for r in torch.cat([inputs, labels[:, -1:]], dim=1).tolist()]
    return out


@pytest.fixture
def data(prepared: Path) -> TokenData:
    return TokenData.open(prepared)


def test_open(data: TokenData, prepared: Path) -> None:
    assert len(data.shards["train"]) > 1 and data.tokens("train") == data.manifest["tokens"]["train"]
    assert data.tokenizer.kind == "bytes"
    with pytest.raises(ValueError):
        data.shards["train"][0][0] = 1  # read-only


def corrupt_copy(prepared: Path, tmp_path: Path, how: str) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(prepared, path)
    shard = path / "train_001.bin"
    raw = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(raw[:-2])
    else:
        raw[100] ^= 0x01
        shard.write_bytes(raw)
    return path


def test_truncated_shard(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shard train_001.bin has \d+ bytes.*truncated"):
        TokenData.open(corrupt_copy(prepared, tmp_path, "truncate"), verify=False)


def test_flipped_byte(prepared: Path, tmp_path: Path) -> None:
    path = corrupt_copy(prepared, tmp_path, "flip")
    with pytest.raises(DataError, match=r"shard train_001.bin does not match its sha256"):
        TokenData.open(path)
    TokenData.open(path, verify=False)  # sizes alone still match


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder.*looped data prepare"):
        TokenData.open(tmp_path / "absent")
    with pytest.raises(DataError, match="no manifest.json"):
        TokenData.open(tmp_path)


def test_deterministic(data: TokenData) -> None:
    a, b, c = (Loader(data, SEQ, 4, 2, seed=s) for s in (3, 3, 4))
    for _ in range(5):
        sa, sb, sc = a.next_step(), b.next_step(), c.next_step()
        assert rows(sa) == rows(sb)
    assert rows(sa) != rows(sc)
    assert [x.shape for pair in sa for x in pair] == [torch.Size([4, SEQ])] * 4


def test_every_window_once_per_epoch(data: TokenData, prepared: Path) -> None:
    expected = Counter(reference_windows(prepared, "train", SEQ))
    loader = Loader(data, SEQ, micro_batch=5, accum=1)
    n = loader.num_windows
    assert n == sum(expected.values()) and n % 5  # the steps straddle the epoch boundary
    stream = []
    while len(stream) < 2 * n:
        stream += rows(loader.next_step())
    assert Counter(stream[:n]) == expected and Counter(stream[n : 2 * n]) == expected
    assert stream[:n] != stream[n : 2 * n]  # a new permutation each epoch
    assert loader.epoch == 2 and loader.tokens_per_step == 5 * SEQ


def test_ranks_equal_accumulation(data: TokenData) -> None:
    single = Loader(data, SEQ, micro_batch=3, accum=4)
    ranks = [Loader(data, SEQ, micro_batch=3, accum=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):  # crosses an epoch boundary
        one = single.next_step()
        two = [step for loader in ranks for step in loader.next_step()]
        assert rows(one) == rows(two)
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_resume_is_exact(data: TokenData) -> None:
    straight = Loader(data, SEQ, micro_batch=4, accum=2, seed=7)
    steps_per_epoch = straight.num_windows // straight.global_batch
    k = steps_per_epoch - 1  # resume just before the epoch boundary
    for _ in range(k):
        straight.next_step()
    state = json.loads(json.dumps(straight.state_dict()))
    assert state["windows_consumed"] == k * 8 and state["epoch"] == 0
    # Resume with the same global batch split differently: two ranks of accum=1.
    resumed = [Loader(data, SEQ, micro_batch=4, accum=1, rank=r, world_size=2, seed=7) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    for _ in range(4):
        assert rows(straight.next_step()) == rows([s for loader in resumed for s in loader.next_step()])
    assert straight.epoch == resumed[0].epoch == 1


def test_resume_rejects_changes(data: TokenData, prepared: Path, tmp_path: Path, make_corpus) -> None:
    state = Loader(data, SEQ, 4, 2).state_dict()
    with pytest.raises(DataError, match="seq_len 16 → 32"):
        Loader(data, 32, 4, 2).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch 8 → 12"):
        Loader(data, SEQ, 4, 3).load_state_dict(state)
    with pytest.raises(DataError, match="seed 0 → 1"):
        Loader(data, SEQ, 4, 2, seed=1).load_state_dict(state)
    other = shutil.copytree(prepared, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # stands in for different data of the same size
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="data "):
        Loader(TokenData.open(other, verify=False), SEQ, 4, 2).load_state_dict(state)


def test_too_small(data: TokenData) -> None:
    with pytest.raises(DataError, match=r"one step needs 4000 windows .* about 64001 tokens"):
        Loader(data, SEQ, micro_batch=1000, accum=2, world_size=2)
    with pytest.raises(DataError, match="rank"):
        Loader(data, SEQ, 1, 1, rank=2, world_size=2)


def test_val_windows(data: TokenData, prepared: Path) -> None:
    expected = reference_windows(prepared, "val", SEQ)
    windows = val_windows(data, SEQ)
    assert windows.dtype == torch.long and windows.shape == (len(expected), SEQ + 1)
    assert [tuple(r) for r in windows.tolist()] == expected
    assert torch.equal(val_windows(data, SEQ, max_windows=3), windows[:3])
    shards = shard_arrays(prepared, "val")
    assert len(shards) == 2  # windows must restart at the shard boundary
    first = (len(shards[0]) - 1) // SEQ
    # Consecutive windows: each starts on the previous one's last token, so every token is a label once.
    assert windows[:first, :-1].flatten().tolist() == shards[0][: first * SEQ].tolist()
    assert windows[first].tolist() == shards[1][: SEQ + 1].tolist()
    assert torch.equal(val_windows(data, SEQ, max_windows=first + 2), windows[: first + 2])
    with pytest.raises(DataError, match="fewer than seq_len"):
        val_windows(data, max(len(s) for s in shards))
