"""KV-cached decoding against recomputation without a cache: per-loop equals the plain model, shared equals a
position-by-position reference that follows the shared rule; memory of the shared cache does not grow with loops."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny
from reference import reference_logits

from looped.infer.cache import KVCache
from looped.infer.forward import forward_cached
from looped.model.lm import LoopedLM

PROMPT = [3, 5, 7, 11, 13, 17]


def decode_logits(model: LoopedLM, ids: list[int], prompt_len: int, loops: int, mode: str) -> torch.Tensor:
    """Prefill the prompt, then feed the remaining ids one at a time; next-token logits after each."""
    cache = KVCache(model.cfg, mode, slots=4)  # small, so the cache has to grow while decoding
    x = torch.tensor([ids])
    out = [forward_cached(model, cache, x[:, :prompt_len], loops=loops).logits[0]]
    for s in range(prompt_len, len(ids)):
        out.append(forward_cached(model, cache, x[:, s : s + 1], loops=loops).logits[0])
    return torch.stack(out)


@pytest.fixture(scope="module", params=["like-init", "zero"])
def model(request):
    cfg = tiny(
        state_init=request.param,
        qk_norm=True,
        n_heads=4,
        n_kv_heads=2,
        block_norm="sandwich",
        logit_softcap=8.0,
    )
    return randomize_(LoopedLM(cfg)).eval()


def greedy_ids(model, loops, steps=10):
    """A sequence the model itself would produce greedily without a cache."""
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), loops=loops).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("loops", [1, 3, 8])
def test_per_loop_cache_equals_the_uncached_model(model, loops):
    ids = greedy_ids(model, loops)
    cached = decode_logits(model, ids, len(PROMPT), loops, "per-loop")
    with torch.no_grad():
        full = model(torch.tensor([ids]), loops=loops).logits[0, len(PROMPT) - 1 :]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert cached.argmax(-1)[:-1].tolist() == ids[len(PROMPT) :]


@pytest.mark.parametrize("loops", [1, 3, 8])
def test_shared_cache_equals_a_recomputation_with_the_shared_rule(model, loops):
    ids = greedy_ids(model, loops)
    cached = decode_logits(model, ids, len(PROMPT), loops, "shared")
    reference = reference_logits(model, ids, len(PROMPT), loops, "shared")
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)
    # The reference is not the plain model, except at one loop where there is only one loop to keep.
    with torch.no_grad():
        full = model(torch.tensor([ids]), loops=loops).logits[0, len(PROMPT) - 1 :]
    assert torch.allclose(reference, full, atol=1e-4) == (loops == 1)


def test_the_reference_follows_the_plain_model_under_the_per_loop_rule(model):
    ids = greedy_ids(model, 3, steps=4)
    with torch.no_grad():
        full = model(torch.tensor([ids]), loops=3).logits[0, len(PROMPT) - 1 :]
    torch.testing.assert_close(
        reference_logits(model, ids, len(PROMPT), 3, "per-loop"), full, atol=1e-4, rtol=0
    )


def filled_cache(model, mode, loops, tokens=20):
    cache = KVCache(model.cfg, mode, slots=32)
    forward_cached(model, cache, torch.tensor([PROMPT]), loops=loops)
    for t in range(tokens):
        forward_cached(model, cache, torch.tensor([[t % 50]]), loops=loops)
    return cache


def test_shared_cache_memory_does_not_depend_on_loops(model):
    one, sixteen = filled_cache(model, "shared", 1), filled_cache(model, "shared", 16)
    assert one.nbytes() == sixteen.nbytes() and one.used_bytes() == sixteen.used_bytes()
    per1, per16 = filled_cache(model, "per-loop", 1), filled_cache(model, "per-loop", 16)
    cfg = model.cfg
    layers1 = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers
    layers16 = cfg.prelude_layers + cfg.coda_layers + 16 * cfg.core_layers
    assert per16.nbytes() * layers1 == per1.nbytes() * layers16  # one entry per (loop, core layer)
    assert per1.nbytes() == one.nbytes()
    # Both agree with the model's accounting of bytes per token.
    tokens = len(PROMPT) + 20
    assert sixteen.used_bytes() == tokens * model.kv_cache_bytes_per_token(16, torch.float32, shared=True)
    assert per16.used_bytes() == tokens * model.kv_cache_bytes_per_token(16, torch.float32, shared=False)


def test_per_loop_cache_takes_the_latest_loop_of_a_position_that_ran_fewer(model):
    """A token at loop t reads, for an earlier token that ran T_j < t loops, its loop-T_j entry: the cached
    logits equal an uncached reference in which that rule is written out position by position."""
    ids = greedy_ids(model, 2, steps=3)
    n = len(ids)
    cache = KVCache(model.cfg, "per-loop")
    x = torch.tensor([ids])
    forward_cached(model, cache, x[:, :-1], loops=2)  # every cached position ran 2 loops
    mixed = forward_cached(model, cache, x[:, -1:], loops=5).logits[0]
    expected = reference_logits(model, ids, n - 1, [2] * (n - 1) + [5], "per-loop")[-1]
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)
    # The rule matters here: reading the earlier tokens at loop t (as if they had run 5) gives other logits.
    as_if_five = reference_logits(model, ids, n - 1, 5, "per-loop")[-1]
    assert (as_if_five - expected).abs().max() > 1e-3


def test_rows_of_different_lengths_share_a_batch(model):
    a, b = greedy_ids(model, 3, steps=2), greedy_ids(model, 3, steps=6)
    cache = KVCache(model.cfg, "per-loop", rows=2)
    width = max(len(a), len(b))
    x = torch.zeros(2, width, dtype=torch.long)
    x[0, : len(a)], x[1, : len(b)] = torch.tensor(a), torch.tensor(b)
    out = forward_cached(model, cache, x, lengths=torch.tensor([len(a), len(b)]), loops=3)
    with torch.no_grad():
        for row, seq in enumerate((a, b)):
            full = model(torch.tensor([seq]), loops=3).logits[0, -1]
            torch.testing.assert_close(out.logits[row], full, atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == [len(a), len(b)]


def test_unknown_mode_and_overlong_sequences_are_errors(model):
    with pytest.raises(ValueError, match="per-loop, shared"):
        KVCache(model.cfg, "paged")
    cache = KVCache(model.cfg, "shared")
    with pytest.raises(ValueError, match="context of 32 tokens"):
        forward_cached(model, cache, torch.zeros(1, 33, dtype=torch.long), loops=1)


class _NoComplex(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that makes a complex tensor (the ONNX and ExecuTorch exporters lower none)."""

    def __init__(self) -> None:
        super().__init__()
        self.complex_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.is_complex() for t in flat):
            self.complex_ops.append(str(func))
        return out


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_no_complex_tensor_in_any_forward_or_backward(pairing):
    model = randomize_(LoopedLM(tiny(rope_pairing=pairing)))
    x = torch.tensor([PROMPT])
    with _NoComplex() as mode:
        model(x, labels=x, loops=3).loss.backward()  # training: the rotation's own backward
        model.eval()
        with torch.no_grad():
            model(x, loops=3)
            for kv in ("per-loop", "shared"):
                decode_logits(model, [*PROMPT, 19, 23], len(PROMPT), 3, kv)
    assert mode.complex_ops == []
