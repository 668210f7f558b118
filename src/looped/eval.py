"""Validation loss against loop counts: the measurement that training logs, `looped eval` and the demo share."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from looped.distributed import Dist, all_reduce_sum


def default_eval_loops(mean_loops: float) -> list[int]:
    """1, 2, 4, μ and 2μ (sorted, without repeats), the sweep Huginn and Parcae report during training."""
    mu = max(1, round(mean_loops))
    return sorted({1, 2, 4, mu, 2 * mu})


@torch.no_grad()
def loss_by_loops(
    model: nn.Module,
    windows: torch.Tensor,
    loops: list[int],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    d: Dist | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[int, float]:
    """Mean next-token loss (nats) on `windows` at each loop count.

    Args:
        model: a LoopedLM, or one wrapped by DDP / FSDP2 (every rank must call this together).
        windows: (N, S+1) token windows; inputs are [:, :-1], labels [:, 1:].
        loops: loop counts to evaluate (ignored by a standard model, which reports the same loss for all).
        batch_size: sequences per forward pass.
        device: where to run.
        d: the process group position; windows are split evenly over ranks and the sums reduced.
        autocast: a context (e.g. bf16 autocast) to run the forward passes in.
    """
    d = d or Dist()
    n = (windows.shape[0] // d.world) * d.world
    if n == 0:
        raise ValueError(f"need at least {d.world} validation windows, got {windows.shape[0]}")
    mine = windows[:n][d.rank :: d.world]
    was_training = model.training
    model.eval()
    out: dict[int, float] = {}
    try:
        for t in loops:
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for i in range(0, mine.shape[0], batch_size):
                batch = mine[i : i + batch_size].to(device)
                with autocast or contextlib.nullcontext():
                    logits = model(batch[:, :-1], loops=t).logits
                nll = nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                )
                total += torch.stack(
                    [nll.double(), torch.tensor(batch[:, 1:].numel(), device=device).double()]
                )
            s, count = all_reduce_sum(total, d).tolist()
            out[t] = s / count
    finally:
        model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
