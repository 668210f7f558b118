"""Training and evaluating a looped encoder on an algorithmic task (`looped.tasks.generators`).

The model is the same LoopedLM as for text, made an encoder (model.causal = false; RoPE only, no absolute
positions, so it can run on longer inputs than it saw) with a class per position. The input is re-injected
every loop, as always. Each step draws a fresh batch of problems at the training size, and a loop count per
problem from the [loops] sampler. Gradients flow through the last k loops only, so the model cannot learn
to count loops: the loops before run without gradient from wherever the state is (Bansal et al.'s
"progressive loss" in spirit).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from looped.checkpoint import init_weights_from, save
from looped.config import Config, ConfigError, from_dict
from looped.model.looped import LoopedLM
from looped.tasks.generators import IGNORE, get_task
from looped.train.optim import build_optimizers, lr_factor
from looped.train.sampler import LoopSampler, step_seed

CONTEXT = 8192  # RoPE table length for task models: test sizes far beyond the training size must fit


def task_config(cfg: Config, task: str) -> Config:
    """`cfg` with its model made an encoder for `task`: the task's vocabulary, untied head, long context."""
    t = get_task(task)
    tree = cfg.to_dict()
    tree["model"].update(
        causal=False, vocab_size=t.vocab_size, tie_embeddings=False, max_seq_len=CONTEXT, value_embeds=False
    )
    return from_dict(tree)


def train_task(
    cfg: Config, task: str, size: int, say: Callable[[str], None] = print
) -> tuple[LoopedLM, list[dict]]:
    """Train an encoder for `task` at problem size `size` for train.steps steps of train.global_batch
    problems; returns the model and the logged records. Saves to train.out/final when train.out is set."""
    t = get_task(task)
    cfg = task_config(cfg, task)
    if not cfg.model.looped:
        raise ConfigError("task training needs a looped model (model.core_layers > 0)")
    torch.manual_seed(cfg.train.seed)
    model = LoopedLM(cfg.model)
    if cfg.train.init_from:  # e.g. a curriculum: the model trained at a smaller size
        init_weights_from(model, cfg.train.init_from)
        say(f"weights from {cfg.train.init_from}")
    model.train()
    opts = build_optimizers(model, cfg.optim)
    sampler = LoopSampler(cfg.loops, cfg.train.seed, cfg.train.steps)
    n, steps = cfg.train.global_batch, cfg.train.steps
    log, start = [], time.perf_counter()
    for step in range(steps):
        opts.set_lr(lr_factor(cfg.optim, step, steps))
        x, y = t.batch(n, size, seed=step_seed(cfg.train.seed, step, stream=1))
        loops = sampler.draw(step, n)
        out = model(x, labels=y, loops=loops, backprop_loops=sampler.backprop_loops)
        if not torch.isfinite(out.loss):
            raise ConfigError(f"task training: non-finite loss at step {step}; lower optim.lr")
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opts.step()
        opts.zero_grad()
        model.constrain_()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            with torch.no_grad():
                pred = out.logits.argmax(-1)
                exact = ((pred == y) | (y == IGNORE)).all(dim=1).float().mean().item()
            rec = {
                "step": step,
                "loss": out.loss.item(),
                "exact": exact,
                "seconds": time.perf_counter() - start,
            }
            log.append(rec)
            say(f"step {step}: loss {rec['loss']:.4f}, exact match {exact:.1%} at size {size}")
    model.eval()
    if cfg.train.out:
        final = Path(cfg.train.out) / "final"
        save(model, final, cfg, task=task, train_size=size)
        (Path(cfg.train.out) / "task_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return model, log


@torch.no_grad()
def evaluate_task(
    model: LoopedLM,
    task: str,
    sizes: list[int],
    loops: list[int],
    n: int = 256,
    seed: int = 10_000,
    batch: int = 64,
) -> dict[int, dict[int, float]]:
    """Whole-problem exact match (every asked position right) at each size and loop count:
    {size: {loops: accuracy}}. Test problems come from another seed than training's."""
    t = get_task(task)
    model.eval()
    table: dict[int, dict[int, float]] = {}
    for size in sizes:
        x, y = t.batch(n, size, seed=seed)
        if x.shape[1] > model.cfg.max_seq_len:
            raise ConfigError(
                f"size {size} makes {x.shape[1]} positions, over the model's {model.cfg.max_seq_len}"
            )
        table[size] = {}
        for loops_t in loops:
            right = 0
            for i in range(0, n, batch):
                logits = model(x[i : i + batch], loops=loops_t).logits
                ok = (logits.argmax(-1) == y[i : i + batch]) | (y[i : i + batch] == IGNORE)
                right += int(ok.all(dim=1).sum())
            table[size][loops_t] = right / n
    return table


def format_task_table(table: dict[int, dict[int, float]], size_name: str) -> str:
    loops = sorted({t for row in table.values() for t in row})
    lines = [f"{size_name:>14} " + " ".join(f"{f'T={t}':>7}" for t in loops)]
    for size, row in table.items():
        lines.append(f"{size:>14} " + " ".join(f"{row.get(t, math.nan):>7.1%}" for t in loops))
    return "\n".join(lines)


def evaluate_task_checkpoint(
    checkpoint: str | Path,
    task: str | None,
    sizes: list[int] | None,
    loops: list[int],
    plot: str | None = None,
) -> dict | None:
    """`looped eval` on a task checkpoint: exact match at `sizes` × `loops` (sizes default: 1×, 2× and 4× the
    training size). None when neither `task` is given nor the checkpoint was trained on one."""
    from looped.checkpoint import load

    run_file = Path(checkpoint) / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    task = task or run.get("task")
    if task is None:
        return None
    t = get_task(task)
    if sizes is None:
        base = int(run.get("train_size", 8))
        sizes = [base, 2 * base, 4 * base] if task != "mazes" else [base, 2 * base + 1, 4 * base + 1]
    model = load(checkpoint)
    if model.cfg.causal:
        raise ConfigError(f"{checkpoint} is a language model, not a task encoder (train one with --task)")
    table = evaluate_task(model, task, sizes, loops)
    out = {"task": task, "size_name": t.size_name, "train_size": run.get("train_size"), "table": table}
    if plot:
        out["plot"] = str(plot_task(table, t.size_name, task, Path(plot)))
    return out


def plot_task(table: dict[int, dict[int, float]], size_name: str, task: str, path: Path) -> Path:
    """Exact match against loops (log₂ axis), one line per problem size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for size, row in table.items():
        xs = sorted(row)
        ax.plot(xs, [100 * row[x] for x in xs], marker="o", label=f"{size} {size_name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T at test time")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(task)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
