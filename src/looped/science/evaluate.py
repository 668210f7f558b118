"""Validation loss against loop counts: the measurement that training logs, `looped eval` and the demo share."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from looped.train.distributed import Dist, all_reduce_sum


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


def evaluate_checkpoint(
    checkpoint: str,
    loops: list[int],
    data: str | None = None,
    max_windows: int | None = None,
    batch_size: int | None = None,
    plot: str | None = None,
) -> dict:
    """Validation loss and perplexity of a checkpoint at each loop count, on its own data's validation split.

    Args:
        checkpoint: a checkpoint directory.
        loops: loop counts to evaluate.
        data: a prepared data directory; None uses the checkpoint's data.path.
        max_windows: validation sequences; None uses the checkpoint's eval.max_windows.
        batch_size: sequences per forward pass; None uses eval.batch_size.
        plot: write a PNG of loss against loops here.
    """
    from looped.checkpoint import load, load_config_dir
    from looped.data.loader import TokenData, val_windows

    cfg = load_config_dir(checkpoint)
    model = load(checkpoint)
    tokens = TokenData.open(data or cfg.data.path)
    if tokens.tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(
            f"{data or cfg.data.path}: its tokenizer has {tokens.tokenizer.vocab_size} tokens, "
            f"the model {model.cfg.vocab_size}; evaluate on the data the model was trained with"
        )
    windows = val_windows(tokens, cfg.data.seq_len, max_windows or cfg.eval.max_windows)
    losses = loss_by_loops(model, windows, loops, batch_size or cfg.eval.batch_size)
    result = {
        "checkpoint": str(checkpoint),
        "data": str(data or cfg.data.path),
        "seq_len": cfg.data.seq_len,
        "tokens": int(windows.shape[0] * cfg.data.seq_len),
        "rows": [
            {
                "loops": t,
                "loss": loss,
                "perplexity": perplexity(loss),
                "flops_per_token": model.flops_per_token(t, cfg.data.seq_len),
            }
            for t, loss in losses.items()
        ],
    }
    if plot:
        from looped.science.plots import plot_loss_vs_loops

        result["plot"] = str(plot_loss_vs_loops({"validation": losses}, plot, title=str(checkpoint)))
    return result


def format_eval(result: dict) -> str:
    """The evaluation as an aligned table."""
    lines = [
        f"{result['checkpoint']}: validation loss on {result['tokens']:,} tokens of {result['data']}",
        f"{'loops':>6} {'loss':>8} {'ppl':>10} {'GFLOP/token':>12}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['loops']:>6} {row['loss']:>8.4f} {row['perplexity']:>10.2f} {row['flops_per_token'] / 1e9:>12.4f}"
        )
    if "plot" in result:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
