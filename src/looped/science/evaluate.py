"""`looped eval`: a checkpoint's validation loss at several loop counts, with or without a KV cache and adaptive exit."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from looped.eval import loss_by_loops, perplexity


@torch.no_grad()
def decode_loss(
    model: nn.Module,
    windows: torch.Tensor,
    loops: int,
    kv_cache: str = "shared",
    exit: str | None = None,
    min_loops: int = 1,
    batch_size: int = 16,
) -> tuple[float, float]:
    """(mean next-token loss, mean loops per token) when every window is fed one token at a time through the
    KV cache, as generation sees it: the `shared` rule, and adaptive exit, change what each token computes.

    Args:
        model: a LoopedLM in eval mode.
        windows: (N, S+1) token windows; inputs are [:, :-1], labels [:, 1:].
        loops: the loop count, or the most loops with `exit`.
        kv_cache: "shared" or "per-loop" (with a fixed loop count, per-loop equals `loss_by_loops`).
        exit: an adaptive-exit criterion such as "kl:1e-3", or None.
        min_loops: no token exits before this many loops.
        batch_size: windows decoded together (one cache row each).
    """
    from looped.infer.cache import KVCache
    from looped.infer.exit import parse_exit
    from looped.infer.forward import forward_cached

    model.eval()
    criterion = parse_exit(exit)
    device = next(model.parameters()).device
    nll = used = count = 0.0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.cfg, kv_cache, rows=x.shape[0], slots=x.shape[1], device=device, dtype=dtype)
        for p in range(x.shape[1]):  # position 0 is a one-token prompt, the rest are decode steps
            out = forward_cached(
                model, cache, x[:, p : p + 1], loops=loops, exit=criterion if p else None, min_loops=min_loops
            )
            nll += float(nn.functional.cross_entropy(out.logits.float(), y[:, p], reduction="sum"))
            used += float(out.loops.sum())
            count += y.shape[0]
    return nll / count, used / count


def evaluate_checkpoint(
    checkpoint: str,
    loops: list[int],
    data: str | None = None,
    max_windows: int | None = None,
    batch_size: int | None = None,
    plot: str | None = None,
    exit: str | None = None,
    kv_cache: str = "shared",
    min_loops: int = 1,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Validation loss, perplexity and bits per byte of a checkpoint at each loop count, on its own data's
    validation split; with `exit`, also the loss and mean loops per token under adaptive exit at each
    loop count as the most (decoded token by token through the KV cache, as in generation).

    Args:
        checkpoint: a checkpoint directory.
        loops: loop counts to evaluate.
        data: a prepared data directory; None uses the checkpoint's data.path.
        max_windows: validation sequences; None uses the checkpoint's eval.max_windows.
        batch_size: sequences per forward pass; None uses eval.batch_size.
        plot: write a PNG of loss against loops here.
        exit: an adaptive-exit criterion ("kl:1e-3", ...); None evaluates fixed loops only.
        kv_cache: the cache rule for the exit rows ("shared" or "per-loop").
        min_loops: with exit, no token stops before this many loops.
        device: "auto", "cpu" or "cuda"; None: the checkpoint's infer.device.
        dtype: "float32" or "bfloat16" weights; None: the checkpoint's infer.dtype.
    """
    from looped.checkpoint import load, load_config_dir
    from looped.data.loader import TokenData, val_windows
    from looped.infer.engine import resolve_device, resolve_dtype

    cfg = load_config_dir(checkpoint)
    place = resolve_device(device or cfg.infer.device)
    model = load(checkpoint, device=place, dtype=resolve_dtype(dtype or cfg.infer.dtype, place))
    tokens = TokenData.open(data or cfg.data.path)
    if tokens.tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(
            f"{data or cfg.data.path}: its tokenizer has {tokens.tokenizer.vocab_size} tokens, "
            f"the model {model.cfg.vocab_size}; evaluate on the data the model was trained with"
        )
    windows = val_windows(tokens, cfg.data.seq_len, max_windows or cfg.eval.max_windows)
    batch_size = batch_size or cfg.eval.batch_size
    losses = loss_by_loops(model, windows, loops, batch_size, device=place)
    labels = windows[:, 1:]
    n_bytes = int(tokens.tokenizer.token_bytes()[labels.numpy()].sum())

    def bpb(loss: float) -> float:
        return loss * labels.numel() / (n_bytes * math.log(2)) if n_bytes else math.nan

    result = {
        "checkpoint": str(checkpoint),
        "data": str(data or cfg.data.path),
        "seq_len": cfg.data.seq_len,
        "tokens": int(labels.numel()),
        "bytes": n_bytes,
        "rows": [
            {
                "loops": t,
                "loss": loss,
                "perplexity": perplexity(loss),
                "bits_per_byte": bpb(loss),
                "flops_per_token": model.flops_per_token(t, cfg.data.seq_len),
            }
            for t, loss in losses.items()
        ],
    }
    curves = {"fixed loops": losses}
    if exit is not None:
        result["exit"], result["kv_cache"] = exit, kv_cache
        result["exit_rows"] = [
            _exit_row(t, *decode_loss(model, windows, t, kv_cache, exit, min_loops, batch_size), bpb)
            for t in loops
        ]
        curves[f"exit {exit} (at mean loops)"] = {r["mean_loops"]: r["loss"] for r in result["exit_rows"]}
    if plot:
        from looped.science.plots import plot_loss_vs_loops

        result["plot"] = str(plot_loss_vs_loops(curves, plot, title=str(checkpoint)))
    return result


def _exit_row(loop_limit: int, loss: float, mean_loops: float, bpb: Callable[[float], float]) -> dict:
    """One row of the adaptive-exit table: a loop limit, the mean loops used under it and the loss."""
    return {
        "loop_limit": loop_limit,
        "mean_loops": mean_loops,
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_byte": bpb(loss),
    }


def format_eval(result: dict) -> str:
    """The evaluation as an aligned table."""
    lines = [
        f"{result['checkpoint']}: validation loss on {result['tokens']:,} tokens of {result['data']}",
        f"{'loops':>6} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'GFLOP/token':>12}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['loops']:>6} {row['loss']:>8.4f} {row['perplexity']:>10.2f} {row['bits_per_byte']:>10.4f}"
            f" {row['flops_per_token'] / 1e9:>12.4f}"
        )
    if result.get("exit_rows"):
        lines.append(
            f"adaptive exit {result['exit']} ({result['kv_cache']} KV cache, decoded token by token):"
        )
        lines.append(f"{'loop limit':>10} {'mean loops':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
        for row in result["exit_rows"]:
            lines.append(
                f"{row['loop_limit']:>10} {row['mean_loops']:>10.2f} {row['loss']:>8.4f} {row['perplexity']:>10.2f}"
                f" {row['bits_per_byte']:>10.4f}"
            )
    if "plot" in result:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
