"""looped's Muon: torch.optim.Muon's update bit for bit in bfloat16, float32 where bf16 products are slow."""

from __future__ import annotations

import pytest
import torch

from looped.config import OptimConfig
from looped.precision import resolve_dtype
from looped.train.muon import Muon, orthogonalize


def _pair(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    return [torch.nn.Parameter(w.clone()) for w in weights], [torch.nn.Parameter(w.clone()) for w in weights]


@pytest.mark.parametrize("nesterov", [True, False])
def test_bfloat16_muon_is_torchs_bit_for_bit(nesterov):
    shapes = [(24, 40), (40, 24), (16, 16)]  # wide, tall (transposed inside) and square
    ours_p, theirs_p = _pair(shapes)
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ours, theirs = Muon(ours_p, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(theirs_p, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours_p, theirs_p, strict=True):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p, strict=True):
        assert torch.equal(a, b)
    # their saved state loads into ours (checkpoints written with torch.optim.Muon resume)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[ours_p[0]]["momentum_buffer"], theirs.state[theirs_p[0]]["momentum_buffer"])


def test_float32_orthogonalization_is_close_to_bfloat16_and_nearly_orthogonal():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    low, high = orthogonalize(g, torch.bfloat16), orthogonalize(g, torch.float32)
    assert high.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert (low.float() - high).abs().max() < 0.05
    s = torch.linalg.svdvals(high)
    assert 0.5 < s.min() and s.max() < 1.5  # the quintic's band, not exactly 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), high.flatten(), dim=0) > 0.95


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def test_auto_picks_float32_where_bf16_products_are_slow(monkeypatch):
    from looped import precision

    cfg = OptimConfig(optimizer="muon")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: False)
    assert resolve_dtype(cfg.muon_ns_dtype, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: True)
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: 2.0)
    assert resolve_dtype(cfg.muon_ns_dtype, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(precision, "bf16_probe_speedup", lambda: 0.01)  # an AVX2-only CPU
    assert resolve_dtype(cfg.muon_ns_dtype, torch.device("cpu")) == torch.float32
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert resolve_dtype(OptimConfig(muon_ns_dtype=name).muon_ns_dtype, torch.device("cpu")) == dtype
