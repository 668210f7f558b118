"""Accounting against independent counts: built modules, FlopCounterMode, K/V tensors produced in a forward."""

from __future__ import annotations

import pytest
import torch
from helpers import ids, tiny
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from looped import LoopedLM, baseline
from looped.model.accounting import flops_per_token, kv_cache_bytes_per_token, param_counts, unrolled_params

VARIANTS = [
    {},
    {"mlp": "swiglu", "n_kv_heads": 2, "tie_embeddings": False},
    {"injection": "linear", "block_norm": "sandwich", "value_embeds": False},
    {"injection": "additive", "readout": False, "prelude_norm": False, "mlp": "gelu"},
    {"core_layers": 0, "prelude_layers": 3},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_param_counts_match_built_model(overrides):
    model = LoopedLM(tiny(**overrides))
    counts = param_counts(model.cfg)
    assert counts == model.num_params()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts["total"] == sum(unique.values())


def counted(model, x, loops, training, backprop_loops=None):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # MATH: SDPA as countable bmm
        if training:
            model(x, labels=x, loops=loops, backprop_loops=backprop_loops).loss.backward()
        else:
            with torch.no_grad():
                model(x, loops=loops)
    return fc.get_total_flops()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_flops_match_flop_counter(overrides):
    model = LoopedLM(tiny(**overrides))
    x = ids(batch=2, seq=16)
    tokens = x.numel()
    for loops in (1, 3):
        expected = flops_per_token(model.cfg, loops, 16) * tokens
        assert counted(model, x, loops, False) == pytest.approx(expected, rel=0.02)
        assert model.flops_per_token(loops, 16) * tokens == expected
    expected = flops_per_token(model.cfg, 4, 16, training=True, backprop_loops=2) * tokens
    assert counted(model.train(), x, 4, True, backprop_loops=2) == pytest.approx(expected, rel=0.02)


def test_forward_only_loops_cost_forward_only():
    cfg = tiny()
    full = flops_per_token(cfg, 8, 64, training=True)
    truncated = flops_per_token(cfg, 8, 64, training=True, backprop_loops=2)
    per_loop = flops_per_token(cfg, 2, 64) - flops_per_token(cfg, 1, 64)
    assert full - truncated == pytest.approx(6 * 2 * per_loop)
    assert flops_per_token(cfg, 8, 64, training=True) == 3 * flops_per_token(cfg, 8, 64)


def kv_bytes_seen(model, x, loops):
    """Bytes of keys and values the attention layers produce per token in one forward (fp32)."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out.numel()))
        for name, m in model.named_modules()
        if name.endswith(("attn.wk", "attn.wv"))
    ]
    with torch.no_grad():
        model(x, loops=loops)
    for h in hooks:
        h.remove()
    return sum(seen) * 4 / x.numel()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}])
def test_kv_bytes_per_loop_match_forward(overrides):
    model = LoopedLM(tiny(**overrides))
    x = ids()
    for loops in (1, 2, 5):
        assert kv_cache_bytes_per_token(model.cfg, loops, torch.float32) == kv_bytes_seen(model, x, loops)
        shared = model.kv_cache_bytes_per_token(loops, torch.float32, shared=True)
        assert shared == kv_bytes_seen(model, x, 1)  # one entry per core layer, whatever the loops
    assert model.kv_cache_bytes_per_token(4, torch.bfloat16) * 2 == model.kv_cache_bytes_per_token(
        4, torch.float32
    )


def test_unrolled_params_count_the_core_per_loop():
    cfg = tiny()
    counts = param_counts(cfg)
    assert unrolled_params(cfg, 1) == counts["total"]
    assert unrolled_params(cfg, 5) == counts["total"] + 4 * counts["core"]


@pytest.mark.parametrize("width", [64, 256])
def test_baseline_matches_params_and_flops(width):
    cfg = tiny(
        width=width,
        vocab_size=512,
        value_embeds=False,
        prelude_layers=2,
        core_layers=2,
        coda_layers=2,
        loops=4,
    )
    by_params = baseline(cfg, match="params")
    assert by_params.core_layers == 0 and by_params.width == cfg.width
    assert by_params.n_layers == 6  # the injection's d² + 3d and C's d² are smaller than one block
    looped_params = param_counts(cfg)["total"]
    assert abs(param_counts(by_params)["total"] - looped_params) / looped_params < 0.02
    by_flops = baseline(cfg, match="flops", loops=4, seq_len=128)
    assert by_flops.n_layers == 2 + 2 * 4 + 2  # each loop becomes distinct layers
    target = flops_per_token(cfg, 4, 128)
    assert abs(flops_per_token(by_flops, 1, 128) - target) / target < 0.02
    LoopedLM(by_flops)(ids(vocab=512))  # the baseline builds and runs


def test_baseline_rejects_unknown_match():
    with pytest.raises(ValueError, match="'params', 'flops'"):
        baseline(tiny(), match="tokens")
