"""How the prelude output e enters the recurrent state each loop, and spectral-norm constraints on weights.

Seen as a linear system h ← Ā·h + B̄·e (+ what the core blocks add), an injection is stable when ρ(Ā) < 1:
- `diagonal` (Parcae, arXiv 2604.12946): Ā = exp(−softplus(dt)·exp(A_log)) per channel, B̄ = softplus(dt)·B,
  so 0 ≤ Ā < 1 for every parameter value;
- `linear` (Huginn, arXiv 2502.05171): h ← W·[h; e], Ā = W_h is unconstrained;
- `additive`: h ← h + e, Ā = I, marginally stable at best;
- `none`: h ← h, e is only the initial state (Ouro loops its whole stack), Ā = I as for additive.
The term in e does not change across loops, so `prepare(e)` computes it once and `step(h, u)` runs per loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from looped.config import ModelConfig

# Smallest decay rate: keeps Ā = exp(−rate) ≤ exp(−1e-6) < 1 also after float32 rounding.
MIN_RATE = 1e-6


class DiagonalInjection(nn.Module):
    """Parcae's injection: h ← Ā ⊙ h + softplus(dt) ⊙ (B e), with Ā = exp(−softplus(dt)·exp(A_log))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.width
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Linear(d, d, bias=False)
        self.init_decay = cfg.init_decay
        self.init_gain = cfg.injection_gain

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # A = −1 and dt = softplus⁻¹(−log decay): Ā starts at init_decay in every channel, B at gain · I.
        self.A_log.zero_()
        rate = -math.log(self.init_decay)
        self.dt_bias.fill_(rate + math.log(-math.expm1(-rate)))
        self.B.weight.copy_(self.init_gain * torch.eye(self.B.weight.shape[0]))

    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ā, softplus(dt)), each (D,). The rate is formed in log space so that no finite parameter gives NaN."""
        x = self.dt_bias.float()
        dt = F.softplus(x)
        # log softplus(x) → x for x ≪ 0; the clamp keeps the unused branch's gradient finite.
        log_dt = torch.where(x < -20, x, torch.log(F.softplus(x.clamp(min=-20))))
        log_rate = log_dt + self.A_log.float()
        decay = torch.exp(-torch.exp(log_rate.clamp(min=math.log(MIN_RATE))))
        return decay, dt

    def decay(self) -> torch.Tensor:
        return self.rates()[0]

    def prepare(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decay, dt = self.rates()
        return decay.to(e.dtype), dt.to(e.dtype) * self.B(e)  # (D,), (B, S, D)

    def step(self, h: torch.Tensor, u: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        decay, drive = u
        return decay * h + drive

    def select(
        self, u: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return u[0], u[1][rows]

    def spectral_radius(self) -> float:
        return float(self.decay().detach().max())

    def input_matrix(self) -> torch.Tensor:
        """B̄ = diag(softplus(dt))·B, the effective map from e into the state."""
        return self.rates()[1][:, None] * self.B.weight.float()


class LinearInjection(nn.Module):
    """Huginn's injection: h ← W·[h; e] = W_h h + W_e e, one unconstrained matrix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W = nn.Linear(2 * cfg.width, cfg.width, bias=cfg.injection_bias)
        self.d = cfg.width

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.W.bias is not None:  # the matrix is initialised with the other hidden matrices
            self.W.bias.zero_()

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        return F.linear(e, self.W.weight[:, self.d :], self.W.bias)  # the bias is loop-invariant too

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.W.weight[:, : self.d]) + u

    def select(self, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return u[rows]

    def spectral_radius(self) -> float:
        return float(torch.linalg.eigvals(self.W.weight[:, : self.d].detach().float()).abs().max())

    def input_matrix(self) -> torch.Tensor:
        return self.W.weight[:, self.d :].float()


class AdditiveInjection(nn.Module):
    """h ← h + e: no parameters, Ā = I."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d = cfg.width

    def reset_parameters(self) -> None:
        pass

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return h + u

    def select(self, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return u[rows]

    def spectral_radius(self) -> float:
        return 1.0

    def input_matrix(self) -> torch.Tensor:
        return torch.eye(self.d)


class NoInjection(nn.Module):
    """h ← h: nothing is injected; the caller starts the state at e (LoopedLM.initial_state)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d = cfg.width

    def reset_parameters(self) -> None:
        pass

    def prepare(self, e: torch.Tensor) -> None:
        return None

    def step(self, h: torch.Tensor, u: None) -> torch.Tensor:
        return h

    def select(self, u: None, rows: torch.Tensor) -> None:
        return None

    def spectral_radius(self) -> float:
        return 1.0

    def input_matrix(self) -> torch.Tensor:
        return torch.zeros(self.d, self.d)


INJECTIONS = {
    "diagonal": DiagonalInjection,
    "linear": LinearInjection,
    "additive": AdditiveInjection,
    "none": NoInjection,
}


def make_injection(cfg: ModelConfig) -> nn.Module:
    return INJECTIONS[cfg.injection](cfg)


def sigma_max(w: torch.Tensor) -> float:
    """Exact largest singular value (for reports and tests, not the training hot path)."""
    return float(torch.linalg.matrix_norm(w.detach().float(), ord=2))


class SpectralConstraint:
    """Holds σ_max(W) ≤ bound for a set of weights by projection after each optimizer step.

    A weight whose Frobenius norm is within the bound needs nothing (σ_max ≤ ‖W‖_F); any other gets its
    exact σ_max (an SVD) and is scaled down to the bound when above it. Power iteration would be cheaper
    but approaches σ_max from below, and then the bound would not hold.
    """

    def __init__(self, weights: dict[str, nn.Parameter], bound: float) -> None:
        self.weights = weights
        self.bound = bound

    @torch.no_grad()
    def apply_(self) -> dict[str, float]:
        """Project every weight back to σ_max ≤ bound; returns σ_max (or the Frobenius bound on it) before projection."""
        sigmas = {}
        for name, p in self.weights.items():
            w = p.float()
            s = float(torch.linalg.matrix_norm(w))
            if s > self.bound:
                s = float(torch.linalg.matrix_norm(w, ord=2))
                if s > self.bound:
                    p.mul_(self.bound / s)
            sigmas[name] = s
        return sigmas
