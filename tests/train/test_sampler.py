"""Loop-depth sampler: deterministic per (seed, step), the configured mean, per-batch and curriculum."""

from __future__ import annotations

import math

import pytest
import torch

from looped.config import ConfigError, LoopsConfig
from looped.train.sampler import LoopSampler


def draws(cfg: LoopsConfig, steps: int = 400, n: int = 32, seed: int = 0) -> torch.Tensor:
    s = LoopSampler(cfg, seed, total_steps=steps)
    return torch.stack([s.draw(step, n) for step in range(steps)])


def test_draws_depend_only_on_seed_and_step():
    s = LoopSampler(LoopsConfig(), seed=3, total_steps=100)
    a = [s.draw(step, 8) for step in range(10)]
    fresh = LoopSampler(LoopsConfig(), seed=3, total_steps=100)
    assert torch.equal(fresh.draw(7, 8), a[7])  # no hidden state: a resumed run draws the same
    assert not torch.equal(a[1], a[2])
    assert not torch.equal(LoopSampler(LoopsConfig(), seed=4, total_steps=100).draw(7, 8), a[7])


@pytest.mark.parametrize("mu", [2.0, 4.0, 8.0])
def test_poisson_mean_and_floor(mu):
    t = draws(LoopsConfig(sampler="poisson", mean_loops=mu)).double()
    assert t.min() >= 1
    # Clamping the zeros to 1 adds P(0) = q = e^−μ to the mean and μ(1 − 2q) + q − q² is the variance.
    q = math.exp(-mu)
    assert abs(t.mean().item() - (mu + q)) < 0.05 * mu
    assert abs(t.var().item() - (mu * (1 - 2 * q) + q - q * q)) < 0.1 * mu


def test_poisson_lognormal_has_the_configured_mean_and_heavier_tail():
    mu = 8.0
    t = draws(LoopsConfig(sampler="poisson-lognormal", mean_loops=mu, max_sampled_loops=200)).double()
    p = draws(LoopsConfig(sampler="poisson", mean_loops=mu, max_sampled_loops=200)).double()
    assert t.min() >= 1
    assert abs(t.mean().item() - mu) < 0.05 * mu
    assert t.var() > 1.5 * p.var()


def test_fixed_and_cap():
    assert torch.all(draws(LoopsConfig(sampler="fixed", mean_loops=3), steps=5) == 3)
    t = draws(LoopsConfig(sampler="poisson", mean_loops=4, max_sampled_loops=5))
    assert t.max() == 5
    assert LoopsConfig(mean_loops=4).resolved_max_sampled_loops == 16


def test_per_batch_gives_one_depth_per_step():
    t = draws(LoopsConfig(per="batch", mean_loops=4), steps=50)
    assert torch.all(t == t[:, :1])
    assert len(set(t[:, 0].tolist())) > 3


# μ over a 100-step run with mean_loops = 9 and curriculum_fraction = 0.5 (a 50-step ramp), by hand from the
# documented shapes at p = step / 50: linear 1 + 8p; sqrt 1 + 8(1 − √(1 − p)), where steps 18, 32 and 48
# give 1 − p = 0.64, 0.36 and 0.04, whose square roots are 0.8, 0.6 and 0.2.
CURRICULUM = {
    "linear": {0: 1.0, 10: 2.6, 18: 3.88, 25: 5.0, 32: 6.12, 48: 8.68, 50: 9.0, 99: 9.0},
    "sqrt": {0: 1.0, 18: 2.6, 32: 4.2, 48: 7.4, 50: 9.0, 99: 9.0},
}


@pytest.mark.parametrize("kind", ["linear", "sqrt"])
def test_curriculum_ramps_from_one_to_mu(kind):
    s = LoopSampler(LoopsConfig(mean_loops=9, curriculum=kind, curriculum_fraction=0.5), 0, total_steps=100)
    for step, mu in CURRICULUM[kind].items():
        assert s.mean_at(step) == pytest.approx(mu, abs=1e-9), (kind, step)
    means = [s.mean_at(step) for step in range(100)]
    assert all(b >= a for a, b in zip(means, means[1:], strict=False))
    # the draws follow the ramp: a fixed sampler draws round(μ) at each step
    fixed = LoopSampler(
        LoopsConfig(sampler="fixed", mean_loops=9, curriculum=kind, curriculum_fraction=0.5),
        0,
        total_steps=100,
    )
    for step, mu in CURRICULUM[kind].items():
        assert torch.all(fixed.draw(step, 4) == round(mu)), (kind, step)


def test_no_curriculum_keeps_mu():
    s = LoopSampler(LoopsConfig(mean_loops=9, curriculum="none", curriculum_fraction=0.5), 0, total_steps=100)
    assert [s.mean_at(step) for step in (0, 10, 99)] == [9, 9, 9]


def test_backprop_depth_default_is_half_the_mean():
    assert LoopSampler(LoopsConfig(mean_loops=8), 0, 10).backprop_loops == 4
    assert LoopSampler(LoopsConfig(mean_loops=5), 0, 10).backprop_loops == 3
    assert LoopSampler(LoopsConfig(mean_loops=8, backprop_loops=2), 0, 10).backprop_loops == 2


def test_bad_loop_configs():
    with pytest.raises(ConfigError, match="mean_loops"):
        LoopsConfig(mean_loops=0.5)
    with pytest.raises(ConfigError, match="poisson-lognormal"):
        LoopsConfig(sampler="poisson-lognormal", mean_loops=1)
    with pytest.raises(ConfigError, match="max_sampled_loops"):
        LoopsConfig(mean_loops=8, max_sampled_loops=4)
