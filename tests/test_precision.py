"""Decoding in the fastest dtype: which dtype `auto` picks (flags, probe, CUDA), bf16 logits against float32
within a stated tolerance, greedy tokens of a trained model, and the cache's float32 single-query attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, tiny

from looped import precision
from looped.infer import cache as cache_module
from looped.infer.cache import CacheLayer, KVCache, SingleQueryLayer
from looped.infer.engine import Engine
from looped.infer.forward import forward_cached
from looped.model.lm import LoopedLM

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2 %); through a few blocks the logits of a
# model with unit-scale weights move by a few hundredths of their largest magnitude.
BF16_LOGIT_TOL = 0.05  # |Δlogit| ≤ 5 % of the largest |logit|


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True),
        ({"avx2", "amx_tile", "amx_bf16"}, True),
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # AVX-512 without BF16: torch emulates bf16
        (set(), False),
    ],
)
def test_native_bf16_is_read_from_the_flags(flags, native):
    assert precision.cpu_has_native_bf16(frozenset(flags)) is native


def test_torch_and_proc_cpuinfo_agree_on_the_bf16_flags():
    try:
        with open("/proc/cpuinfo") as f:
            proc = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    mine = precision.cpu_flags()
    assert {f for f in precision.BF16_FLAGS if f in proc} == {f for f in precision.BF16_FLAGS if f in mine}


def test_cpu_flags_fall_back_to_proc_cpuinfo(monkeypatch):
    def missing():
        raise AttributeError("this torch has no cpu capability query")

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", missing, raising=False)
    try:
        with open("/proc/cpuinfo") as f:
            expected = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        expected = set()
    assert precision.cpu_flags() == expected


def test_auto_picks_bf16_only_with_the_flags_and_a_probe_that_agrees(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: pytest.fail("probed without the flags"))
    assert precision.fastest_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: 1.8)
    assert precision.fastest_dtype("cpu") == torch.bfloat16
    assert precision.fastest_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: 0.4)  # flags, but kernels that ignore them
    assert precision.fastest_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: 1.1)  # within noise of float32: not believed
    assert precision.fastest_dtype("cpu") == torch.float32


def test_auto_on_cuda_follows_torch(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: pytest.fail("CPU flags asked for a CUDA device"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.fastest_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.fastest_dtype("cuda:0") == torch.float32


def test_the_probe_measures_once_per_process():
    first = precision.bf16_probe_speedup()
    assert 0 < first < float("inf")
    assert precision.bf16_probe_speedup() == first  # cached, not re-timed


def decode(model: LoopedLM, ids: torch.Tensor, prompt: int, loops: int) -> torch.Tensor:
    """Prefill `prompt` tokens, then feed the rest one at a time: next-token logits after each, (N, V)."""
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, "shared", slots=8, dtype=dtype)
    out = [forward_cached(model, cache, ids[:, :prompt], loops=loops).logits[0]]
    for s in range(prompt, ids.shape[1]):
        out.append(forward_cached(model, cache, ids[:, s : s + 1], loops=loops).logits[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def models():
    cfg = tiny(width=64, n_heads=4, n_kv_heads=2, qk_norm=True, max_seq_len=128)
    fp32 = randomize_(LoopedLM(cfg)).eval()
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


@pytest.mark.parametrize("loops", [1, 4])
def test_bf16_decode_logits_are_within_tolerance_of_float32(models, loops):
    fp32, bf16 = models
    ids = torch.randint(0, fp32.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(loops))
    hi, lo = decode(fp32, ids, 8, loops), decode(bf16, ids, 8, loops)
    assert lo.dtype == torch.float32  # the head's logits are float32 in every precision
    scale = float(hi.abs().max())
    err = float((hi - lo).abs().max())
    assert err <= BF16_LOGIT_TOL * scale, f"max |Δlogit| {err:.4f} against a logit scale {scale:.2f}"
    assert err > 0  # bf16 did run: the copy is not float32 in disguise
    # Wherever float32's top token leads by more than twice the error, bf16 picks the same token.
    top2 = hi.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert bool(clear.any())
    assert torch.equal(hi.argmax(-1)[clear], lo.argmax(-1)[clear])


def test_bf16_greedy_tokens_of_a_trained_model_follow_float32(trained):
    fp32 = Engine.from_checkpoint(trained, dtype="float32", device="cpu")
    bf16 = Engine.from_checkpoint(trained, dtype="bfloat16", device="cpu")
    same = total = 0
    for prompt in ("the king", "a dog", "once there"):
        a = fp32.generate(prompt, loops=4, max_new_tokens=16, temperature=0).token_ids
        b = bf16.generate(prompt, loops=4, max_new_tokens=16, temperature=0).token_ids
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        total += len(a)
    # Greedy paths may part at a near tie and then differ; most tokens come before any such parting.
    assert same >= 0.75 * total, f"only {same} of {total} greedy tokens before the paths part"


def one_step_view(cfg, dtype: torch.dtype, length: int):
    """A cache holding `length` tokens of row 0 and the view of a decode step writing slot `length`."""
    cache = KVCache(cfg, "shared", slots=length + 1, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for K in cache.group("core", 0):
        K[0, :, :length] = torch.randn(K[0, :, :length].shape, generator=gen).to(dtype)
    cache.lengths[0] = length
    return cache, cache.view(torch.tensor([0]), torch.tensor([[length]]))


def test_single_query_attention_equals_sdpa_on_the_same_keys():
    cfg = tiny(
        width=64, n_heads=4, n_kv_heads=2, max_seq_len=1024
    )  # grouped-query: 2 query heads per key head
    n = cache_module.SINGLE_QUERY_MIN_ELEMENTS // (cfg.n_heads * cfg.resolved_head_dim) + 1
    cache, view = one_step_view(cfg, torch.bfloat16, n)
    layer = view.layer("core", 0)
    assert isinstance(layer, SingleQueryLayer)
    gen = torch.Generator().manual_seed(1)
    hd = cfg.resolved_head_dim
    q = torch.randn(1, 1, 4, hd, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(1, 1, 2, hd, generator=gen).to(torch.bfloat16) for _ in range(2))
    got = layer.attend(q, k, v)  # (1, 1, H·hd), also stores k and v at slot n
    K, V = cache.group("core", 0)
    assert torch.equal(K[0, :, n], k[0, 0]) and torch.equal(V[0, :, n], v[0, 0])
    keys, values = K[:, :, : n + 1].double(), V[:, :, : n + 1].double()
    want = F.scaled_dot_product_attention(q.double().transpose(1, 2), keys, values, enable_gqa=True)
    want = want.transpose(1, 2).reshape(1, 1, -1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-3)  # bf16's rounding of the output


def test_single_query_attention_is_used_only_where_it_pays():
    cfg = tiny(width=64, n_heads=4, max_seq_len=1024)
    per_key = cfg.n_heads * cfg.resolved_head_dim
    enough = cache_module.SINGLE_QUERY_MIN_ELEMENTS // per_key + 1
    assert isinstance(one_step_view(cfg, torch.bfloat16, enough)[1].layer("core", 0), SingleQueryLayer)
    few = one_step_view(cfg, torch.bfloat16, 4)[1].layer("core", 0)  # torch's kernel is faster here
    assert type(few) is CacheLayer
    fp32 = one_step_view(cfg, torch.float32, enough)[1].layer("core", 0)  # SDPA is fast in float32
    assert type(fp32) is CacheLayer
    cache = KVCache(cfg, "shared", slots=enough + 4, dtype=torch.bfloat16)
    prompt = cache.view(torch.tensor([0]), torch.arange(enough + 2)[None])  # a prompt: many queries
    assert type(prompt.layer("core", 0)) is CacheLayer


def test_bf16_decoding_is_as_close_to_float32_with_either_attention(models, monkeypatch):
    fp32, bf16 = models
    ids = torch.randint(0, bf16.cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(5))
    exact = decode(fp32, ids, 8, 3)
    monkeypatch.setattr(cache_module, "SINGLE_QUERY_MIN_ELEMENTS", 0)
    fast = decode(bf16, ids, 8, 3)
    monkeypatch.setattr(cache_module, "SINGLE_QUERY_MIN_ELEMENTS", 1 << 60)
    plain = decode(bf16, ids, 8, 3)
    assert not torch.equal(fast, plain)  # the two paths did run
    err_fast, err_plain = float((fast - exact).abs().max()), float((plain - exact).abs().max())
    assert err_fast <= BF16_LOGIT_TOL * float(exact.abs().max())
    assert err_fast <= 1.5 * err_plain  # accumulating in float32 loses nothing against torch's kernel


def test_a_shared_core_layer_is_one_object_for_every_loop():
    cfg = tiny()
    view = KVCache(cfg, "shared").view(torch.tensor([0]), torch.tensor([[0]]))
    assert view.layer("core", 1, 0) is view.layer("core", 1, 5)
    assert view.layer("core", 0, 0) is not view.layer("core", 1, 0)
    per_loop = KVCache(cfg, "per-loop")
    per_loop.ensure_loops(2)
    view = per_loop.view(torch.tensor([0]), torch.tensor([[0]]))
    assert view.layer("core", 0, 0) is not view.layer("core", 0, 1)


def test_single_query_attention_keeps_the_rows_of_a_batch_apart(models, monkeypatch):
    """Rows decoded together through SingleQueryLayer give each row's logits decoded alone."""
    _, bf16 = models
    monkeypatch.setattr(cache_module, "SINGLE_QUERY_MIN_ELEMENTS", 0)
    ids = torch.randint(0, bf16.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    together = KVCache(bf16.cfg, "shared", rows=3, slots=8, dtype=torch.bfloat16)
    forward_cached(bf16, together, ids[:, :8], loops=2)
    for s in range(8, 20):
        out = forward_cached(bf16, together, ids[:, s : s + 1], loops=2).logits
    for b in range(3):
        alone = decode(bf16, ids[b : b + 1], 8, 2)[-1]
        torch.testing.assert_close(out[b], alone, rtol=0, atol=1e-2 * float(alone.abs().max()))
    assert not torch.allclose(out[0], out[1])  # the rows differ, so mixing them up would show
