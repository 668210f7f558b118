"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from looped import LoopedLM
from looped.config import OptimConfig
from looped.train.muon import Muon
from looped.train.optim import build_optimizers, lr_factor, split_params


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_norms_injection_and_embeddings():
    model = LoopedLM(tiny(spectral_norm=[]))
    hidden, rest = split_params(model)
    h, r = names(model, hidden), names(model, rest)
    assert not h & r
    assert "core.0.attn.wq.weight" in h and "readout.weight" in h and "prelude.0.mlp.w_in.weight" in h
    assert {"embed.weight", "injection.A_log", "injection.B.weight"} <= r
    assert all("norm" not in n for n in h)
    assert not any(n.startswith(("embed", "value_embeds", "injection")) for n in h)
    opt = build_optimizers(model, OptimConfig(optimizer="adamw", weight_decay=0.1)).optimizers[0]
    decays = {g["weight_decay"]: names(model, g["params"]) for g in opt.param_groups}
    assert decays[0.1] == h and decays[0.0] == r


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = LoopedLM(tiny())
    opts = build_optimizers(model, OptimConfig(optimizer="muon"))
    muon, adamw = opts.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 97, (2, 2, 8), generator=gen)
    model(x, labels=y).loss.backward()
    # wo: its gradient is non-zero even at init (Parcae's init zeroes wo itself, which blocks wq's gradient).
    before = model.core[0].attn.wo.weight.detach().clone()
    opts.set_lr(1.0)
    opts.step()
    update = model.core[0].attn.wo.weight.detach() - before
    # Muon's update is the gradient orthogonalised: its 16 (= tokens, the gradient's rank) leading singular
    # values sit near one scale, where the raw gradient's spread far wider.
    s = torch.linalg.svdvals(update)[:16]
    g = torch.linalg.svdvals(model.core[0].attn.wo.weight.grad)[:16]
    assert s.min() > 0.4 * s.max()
    assert g.min() < 0.2 * g.max()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize(("rule", "k", "factor"), [("1/k", 4, 0.25), ("1/sqrt(k)", 4, 0.5), ("1", 4, 1.0)])
def test_core_and_injection_learning_rates(optimizer, rule, k, factor):
    """The core's parameters at lr·(1/k or 1/√k), the injection's, prelude norm's and readout's at
    lr·injection_lr_scale, the rest at lr; schedules scale every group alike, and `lr` reports the base."""
    model = LoopedLM(tiny(spectral_norm=[]))
    cfg = OptimConfig(optimizer=optimizer, lr=1e-3, muon_lr=0.02, core_lr_scale=rule, injection_lr_scale=3.0)
    opts = build_optimizers(model, cfg, backprop_loops=k)
    rate = {}
    for opt in opts.optimizers:
        base = 0.02 if isinstance(opt, Muon) else 1e-3
        for g in opt.param_groups:
            for n in names(model, g["params"]):
                rate[n] = g["lr"] / base
    assert rate["core.0.attn.wq.weight"] == pytest.approx(factor)
    assert rate["core.1.mlp.w_out.weight"] == pytest.approx(factor) and rate[
        "core.0.attn_norm.weight"
    ] == pytest.approx(factor)
    assert (
        rate["injection.B.weight"]
        == rate["injection.dt_bias"]
        == rate["readout.weight"]
        == pytest.approx(3.0)
    )
    assert rate["prelude_norm.weight"] == pytest.approx(3.0)
    assert rate["prelude.0.attn.wq.weight"] == rate["embed.weight"] == rate["coda.0.mlp.w_in.weight"] == 1.0
    assert len(rate) == len(list(model.parameters()))
    assert opts.lr == pytest.approx(0.02 if optimizer == "muon" else 1e-3)
    opts.set_lr(0.5)
    assert opts.lr == pytest.approx(0.01 if optimizer == "muon" else 5e-4)
    for opt in opts.optimizers:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.5 * g["base_lr"])


def test_wsd_schedule():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, cooldown_fraction=0.5, min_lr_ratio=0.1)
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:50])
    assert f[75] == pytest.approx(1 - 0.9 * 0.5)
    assert all(b <= a for a, b in zip(f[50:], f[51:], strict=False)) and f[99] > 0.1


def test_cosine_and_constant():
    cos = OptimConfig(schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cos, 100, 100) == pytest.approx(0.0)
    assert lr_factor(OptimConfig(schedule="constant"), 99, 100) == 1.0


def test_part_learning_rate_settings_are_checked():
    from looped.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.injection_lr_scale must be > 0"):
        OptimConfig(injection_lr_scale=0.0).validate()
