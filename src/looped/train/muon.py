"""Muon for 2-D hidden matrices, with the orthogonalisation in a dtype chosen for the device.

The update is torch.optim.Muon's: Nesterov momentum, then five quintic Newton–Schulz steps that push the
update's singular values towards 1, then a step scaled by √max(1, rows / cols). torch runs the Newton–Schulz
products in bfloat16, which is right on a GPU and on a CPU with bf16 matrix units, and ~100× slower than
float32 on a CPU without them (AVX2 only), where it would dominate a small model's step. `ns_dtype` picks:
`looped.precision.resolve_dtype` (auto: the device's fastest) decides it from `optim.muon_ns_dtype`. In bfloat16 the update
is torch's bit for bit (tests/train/test_muon.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

# The quintic's coefficients and steps (Keller Jordan's Muon; torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(update: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximately orthogonal matrix with `update`'s singular vectors (singular values in about
    [0.5, 1.5]), computed in `dtype` and returned in it."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=NS_EPS))  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters; groups carry lr, weight_decay (decoupled), momentum and nesterov.

    Args:
        params: matrices, or parameter groups of them.
        lr: the peak rate (each group may have its own).
        ns_dtype: the dtype of the Newton–Schulz products (bfloat16 is torch.optim.Muon's).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}"
                    )
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))
        return loss
