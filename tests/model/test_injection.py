"""Injections and constraints: ρ(Ā) < 1 for any parameters, the spectral bound holds, the stability report is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ids, randomize_, tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from looped import LoopedLM
from looped.model.injection import DiagonalInjection, sigma_max

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, 16, elements=finite32), arrays(np.float32, 16, elements=finite32))
def test_diagonal_decay_below_one_for_any_parameters(a_log, dt_bias):
    inj = DiagonalInjection(tiny(width=16, n_heads=2, value_gate_channels=8))
    with torch.no_grad():
        inj.A_log.copy_(torch.from_numpy(a_log))
        inj.dt_bias.copy_(torch.from_numpy(dt_bias))
    decay = inj.decay().detach()
    assert torch.isfinite(decay).all()
    assert float(decay.max()) < 1.0 and float(decay.min()) >= 0.0
    assert inj.spectral_radius() < 1.0


def test_diagonal_gradients_finite_at_extreme_parameters():
    inj = DiagonalInjection(tiny())
    with torch.no_grad():
        inj.A_log.fill_(80.0)
        inj.dt_bias[:16] = -200.0
    inj.decay().sum().backward()
    assert torch.isfinite(inj.A_log.grad).all() and torch.isfinite(inj.dt_bias.grad).all()


def test_diagonal_init_matches_parcae():
    inj = DiagonalInjection(tiny(init_decay=0.447))
    inj.reset_parameters()
    decay, dt = inj.rates()
    torch.testing.assert_close(decay, torch.full_like(decay, 0.447))
    torch.testing.assert_close(dt, torch.full_like(dt, 0.805), atol=1e-3, rtol=0)
    torch.testing.assert_close(inj.B.weight, torch.eye(32))


def test_readout_init():
    """Parcae's readout is orthogonal with singular values √(2/5); readout_init = "identity" starts it at I."""
    parcae = LoopedLM(tiny()).readout.weight
    s = torch.linalg.svdvals(parcae)
    torch.testing.assert_close(s, torch.full_like(s, (2 / 5) ** 0.5))
    assert not torch.allclose(parcae, torch.eye(32) * (2 / 5) ** 0.5)  # a rotation, not a scaled identity
    torch.testing.assert_close(LoopedLM(tiny(readout_init="identity")).readout.weight, torch.eye(32))


def test_residual_readout_starts_as_the_identity_and_learns_a_difference():
    """readout_init = "residual" reads out h + ΔC·h with ΔC = 0 at init: the same model as the identity
    readout at init (same seed, same logits), but weight decay on ΔC pulls C towards I instead of 0."""
    torch.manual_seed(0)
    identity = LoopedLM(tiny(readout_init="identity")).eval()
    torch.manual_seed(0)
    residual = LoopedLM(tiny(readout_init="residual")).eval()
    assert not residual.readout.weight.any()
    x = ids(2, 8)
    torch.testing.assert_close(residual(x, loops=3).logits, identity(x, loops=3).logits)
    with torch.no_grad():
        residual.readout.weight.fill_(0.01)
    h = torch.randn(1, 4, 32)
    torch.testing.assert_close(
        residual.run_coda(h, residual.rotary(4), {}), _coda(residual, h + 0.01 * h.sum(-1, keepdim=True))
    )


def _coda(model, x):
    for block in model.coda:
        x = block(x, model.rotary(x.shape[1]), None, None)
    return x


def test_injection_gain_scales_b():
    inj = DiagonalInjection(tiny(injection_gain=0.5))
    inj.reset_parameters()
    torch.testing.assert_close(inj.B.weight, 0.5 * torch.eye(32))
    torch.testing.assert_close(inj.input_matrix(), 0.5 * inj.rates()[1][:, None] * torch.eye(32))


@pytest.mark.parametrize("injection", ["diagonal", "linear"])
def test_spectral_bound_holds_after_optimizer_steps(injection):
    bound = 0.8
    cfg = tiny(injection=injection, spectral_norm=["injection", "readout", "core"], spectral_bound=bound)
    model = randomize_(LoopedLM(cfg))
    model.constrain_()
    constrained = model.constrained_weights()
    assert "readout.weight" in constrained and "core.1.mlp.w_out.weight" in constrained
    assert ("injection.B.weight" if injection == "diagonal" else "injection.W.weight") in constrained
    assert not any(n.startswith(("prelude", "coda", "embed")) for n in constrained)
    free = {n: p.detach().clone() for n, p in model.named_parameters() if n not in constrained}
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    x = ids()
    for _ in range(5):
        loss = model(x, labels=x, loops=2).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.constrain_()
        for name, p in constrained.items():
            assert sigma_max(p) <= bound * 1.01, name
    # The optimizer pushed at least one weight above the bound, so the projection was exercised.
    assert any(abs(sigma_max(p) - bound) < 1e-2 for p in constrained.values())
    moved = [n for n, p in model.named_parameters() if n in free and not torch.equal(p, free[n])]
    assert moved  # the rest trains freely


def test_core_out_group_names_only_output_projections():
    model = LoopedLM(tiny(spectral_norm=["core-out"]))
    assert sorted(model.constrained_weights()) == [
        "core.0.attn.wo.weight",
        "core.0.mlp.w_out.weight",
        "core.1.attn.wo.weight",
        "core.1.mlp.w_out.weight",
    ]


def test_stability_report_at_init_contracts_at_the_decay():
    # At init the core's output projections are zero, so each loop is h ← Ā h + B̄ e with Ā = 0.447·I:
    # successive differences shrink by exactly 0.447.
    model = LoopedLM(tiny(init_decay=0.447))
    report = model.stability_report(ids(), loops=6)
    assert report.rho == pytest.approx(0.447, abs=1e-6)
    assert len(report.state_norms) == 6 and len(report.contraction) == 5
    for ratio in report.contraction:
        assert ratio == pytest.approx(0.447, rel=1e-3)
    assert report.sigma["readout.C"] == pytest.approx((2 / 5) ** 0.5, rel=1e-4)
    assert "core.0.attn.wq.weight" in report.sigma
    assert model.training  # the report restores the mode


def test_stability_report_radius_of_linear_and_additive():
    lin = randomize_(LoopedLM(tiny(injection="linear")))
    w_h = lin.injection.W.weight[:, :32].detach()
    assert lin.stability_report().rho == pytest.approx(float(torch.linalg.eigvals(w_h).abs().max()), rel=1e-5)
    assert LoopedLM(tiny(injection="additive")).stability_report().rho == 1.0
