"""Loop-depth sampling for training: fixed, Poisson (Parcae) or Poisson-lognormal (Huginn), with a curriculum.

Draws depend only on (seed, step), never on the rank or on how many draws came before, so a resumed run
draws the same depths and a 2-process run draws what a 1-process run with the same global batch draws.
"""

from __future__ import annotations

import math

import torch

from looped.config import LoopsConfig

# Mixes the step into the seed so neighbouring steps get unrelated streams (as Parcae's 514229 + step).
_STEP_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, stream)."""
    return (seed * 1_000_003 + step * _STEP_MIX + stream * 7_919) % (2**63 - 1)


class LoopSampler:
    """Depths T for the sequences of one global batch, and the backprop depth k.

    Args:
        cfg: the [loops] section.
        seed: the run seed.
        total_steps: length of the run, for the curriculum ramp.
    """

    def __init__(self, cfg: LoopsConfig, seed: int, total_steps: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps

    def mean_at(self, step: int) -> float:
        """μ at a step: the curriculum ramps it from 1 to mean_loops over the first curriculum_fraction of steps."""
        mu = self.cfg.mean_loops
        ramp = self.cfg.curriculum_fraction * self.total_steps
        if self.cfg.curriculum == "none" or ramp <= 0 or step >= ramp:
            return mu
        p = step / ramp
        frac = p if self.cfg.curriculum == "linear" else 1 - math.sqrt(1 - p)
        return 1 + (mu - 1) * frac

    @property
    def backprop_loops(self) -> int:
        """k: each sequence carries gradients through its last min(T, k) loops."""
        return self.cfg.resolved_backprop_loops

    def draw(self, step: int, n: int) -> torch.Tensor:
        """Depths for the n sequences of the global batch at `step`: a (n,) LongTensor in
        [1, loops.max_sampled_loops]."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        mu = self.mean_at(step)
        m = n if self.cfg.per == "sequence" else 1
        kind = self.cfg.sampler
        if kind == "fixed":
            t = torch.full((m,), float(round(mu)))
        elif kind == "poisson":
            t = torch.poisson(torch.full((m,), mu), generator=gen)
        else:
            # Huginn: T = 1 + Poisson(r), r ~ LogNormal(log(μ−1) − σ²/2, σ), so E[r] = μ − 1 and E[T] = μ.
            sigma = self.cfg.lognormal_sigma
            base = max(mu - 1, 1e-6)
            z = torch.randn((m,), generator=gen)
            rate = torch.exp(math.log(base) - sigma**2 / 2 + sigma * z)
            t = 1 + torch.poisson(rate, generator=gen)
        t = t.clamp(1, self.cfg.resolved_max_sampled_loops).long()
        return t if m == n else t.expand(n).clone()
