"""`looped compare CONFIG --budget tokens=N|flops=F`: a looped model against its parameter-matched and
FLOP-matched standard baselines, trained on the same data, order and schedule shape, each at its own best
learning rate from a small grid, over several seeds.

Fairness, as built here:
- the baselines come from `looped.baseline` (the same code, `core_layers = 0`, depth chosen to match);
- every run reads the same token stream (data order is a function of train.seed, shared by all models);
- the schedule has the same shape (warmup, decay fraction) scaled to each run's steps;
- a learning rate is picked per model, by the seed-0 validation loss over `lrs`: deeper models want lower
  rates, and a shared rate would decide the comparison by itself (with Muon, a grid point scales Muon's
  rate by the same factor: `sweep.set_lr`);
- with a FLOP budget, each model gets the tokens its training FLOPs per token allow.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

from looped.config import Config, ConfigError, from_dict, load_config
from looped.model import accounting
from looped.science.sweep import RESULTS, execute, finished_runs, read_results, set_lr

ROLES = ("looped", "params-matched", "flops-matched")


def parse_budget(text: str) -> tuple[str, float]:
    """ "tokens=2e6" or "flops=1e13" → (kind, amount)."""
    kind, _, value = text.partition("=")
    kind = kind.strip().lower()
    if kind not in ("tokens", "flops"):
        raise ConfigError(f"--budget must be tokens=N or flops=F, got {text!r}")
    try:
        amount = float(value)
    except ValueError:
        raise ConfigError(f"--budget {text!r}: {value!r} is not a number") from None
    if not amount > 0 or math.isinf(amount):
        raise ConfigError(f"--budget {text!r}: must be a positive number")
    return kind, amount


def models(cfg: Config) -> dict[str, Config]:
    """The looped config and its two baselines, each a whole Config (same data, optimizer and schedule)."""
    if not cfg.model.looped:
        raise ConfigError("looped compare needs a looped model (model.core_layers > 0)")
    mu = max(1, round(cfg.loops.mean_loops))
    out = {"looped": cfg}
    for role, match in (("params-matched", "params"), ("flops-matched", "flops")):
        base = accounting.baseline(cfg.model, match=match, loops=mu)
        tree = cfg.to_dict()
        tree["model"] = base.to_dict()
        out[role] = from_dict(tree)
    return out


def training_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token at the mean loop count (forward-only loops counted once)."""
    mu = max(1, round(cfg.loops.mean_loops)) if cfg.model.looped else 1
    k = min(mu, cfg.loops.resolved_backprop_loops) if cfg.model.looped else None
    return accounting.flops_per_token(cfg.model, mu, cfg.data.seq_len, training=True, backprop_loops=k)


def steps_for(cfg: Config, kind: str, amount: float) -> int:
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    tokens = amount if kind == "tokens" else amount / training_flops_per_token(cfg)
    return max(1, round(tokens / tokens_per_step))


def compare(
    config: list[str],
    overrides: list[str],
    budget: str,
    seeds: int = 3,
    lrs: list[float] | None = None,
    eval_loops: list[int] | None = None,
    eval_windows: int = 64,
    out: str | Path | None = None,
    parallel: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the comparison and return its summary (also written to OUT/compare.json)."""
    cfg = load_config(config, overrides)
    kind, amount = parse_budget(budget)
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    lrs = lrs or [cfg.optim.lr / 3, cfg.optim.lr, cfg.optim.lr * 3]
    mu = max(1, round(cfg.loops.mean_loops))
    eval_loops = eval_loops or sorted({1, 2, mu, 2 * mu})
    out = Path(out or Path(cfg.train.out).with_name(Path(cfg.train.out).name + "-compare"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    configs = models(cfg)
    steps = {role: steps_for(c, kind, amount) for role, c in configs.items()}

    def job(role: str, lr: float, seed: int):
        name = f"{role}_lr{lr:g}_seed{seed}"
        tree = configs[role].to_dict()
        set_lr(tree, lr)
        tree["train"].update(seed=seed, steps=steps[role], out=str(out / name))
        tree["eval"]["every"] = 0
        return name, from_dict(tree), {"model": role, "lr": lr}

    # 1. the learning-rate grid at seed 0, for every model
    done = finished_runs(results)
    say(
        f"compare: {len(ROLES)} models × {len(lrs)} learning rates, then {seeds - 1} more seeds each; budget {budget}"
    )
    grid = [job(role, lr, 0) for role in ROLES for lr in lrs]
    execute([j for j in grid if j[0] not in done], results, parallel, eval_loops, eval_windows, say)
    records = read_results(results)
    best_lr = {}
    for role in ROLES:
        tried = {
            r["lr"]: r["loss"]
            for r in records
            if r["model"] == role and r["seed"] == 0 and r["loops"] == _native(role, mu) and r["lr"] in lrs
        }
        if not tried:
            raise ConfigError(f"compare: no finished seed-0 run for {role}; see the messages above")
        best_lr[role] = min(tried, key=tried.get)
    # 2. the remaining seeds at each model's best rate
    done = finished_runs(results)
    more = [job(role, best_lr[role], s) for role in ROLES for s in range(1, seeds)]
    execute([j for j in more if j[0] not in done], results, parallel, eval_loops, eval_windows, say)
    summary = summarize(read_results(results), best_lr, seeds, mu, budget, lrs)
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["plot"] = str(plot_compare(summary, out / "compare.png"))
    summary["out"] = str(out)
    return summary


def _native(role: str, mu: int) -> int:
    """The loop count a model is judged at: μ for the looped model, 1 for a standard one (loops do nothing)."""
    return mu if role == "looped" else 1


def summarize(records: list[dict], best_lr: dict, seeds: int, mu: int, budget: str, lrs: list[float]) -> dict:
    rows = []
    for role in ROLES:
        mine = [r for r in records if r["model"] == role and r["lr"] == best_lr[role] and r["seed"] < seeds]
        at = [r for r in mine if r["loops"] == _native(role, mu)]
        losses = [r["loss"] for r in at]
        curve = {}
        for r in mine:
            curve.setdefault(r["loops"], []).append(r["loss"])
        rows.append(
            {
                "model": role,
                "params": at[0]["params"] if at else None,
                "flops": statistics.mean(r["flops"] for r in at) if at else None,
                "tokens": at[0]["tokens"] if at else None,
                "seconds": statistics.mean(r["seconds"] for r in at) if at else None,
                "lr": best_lr[role],
                "seeds": len(losses),
                "loss": statistics.mean(losses) if losses else None,
                "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "loss_by_loops": {t: statistics.mean(v) for t, v in sorted(curve.items())},
                "lr_grid": {
                    r["lr"]: r["loss"]
                    for r in records
                    if r["model"] == role
                    and r["seed"] == 0
                    and r["loops"] == _native(role, mu)
                    and r["lr"] in lrs
                },
            }
        )
    return {"budget": budget, "mean_loops": mu, "rows": rows}


def format_compare(summary: dict) -> str:
    lines = [
        f"budget {summary['budget']}; looped model judged at {summary['mean_loops']} loops, baselines at 1",
        f"{'model':<15} {'params':>10} {'train FLOPs':>12} {'tokens':>11} {'lr':>8} {'seeds':>5} "
        f"{'val loss':>17} {'time/run':>9}",
    ]
    for r in summary["rows"]:
        loss = f"{r['loss']:.4f} ± {r['loss_std']:.4f}" if r["loss"] is not None else "-"
        lines.append(
            f"{r['model']:<15} {r['params'] or 0:>10,} {r['flops'] or 0:>12.3e} {r['tokens'] or 0:>11,} "
            f"{r['lr']:>8.2g} {r['seeds']:>5} {loss:>17} {r['seconds'] or 0:>8.0f}s"
        )
    looped = summary["rows"][0]["loss_by_loops"]
    lines.append("looped model, loss by loops: " + "  ".join(f"T={t}: {v:.4f}" for t, v in looped.items()))
    for r in summary["rows"]:
        grid = "  ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(r["lr_grid"].items()))
        lines.append(f"learning rates, {r['model']} (seed 0): {grid}")
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}  ·  records: {summary.get('out', '.')}/{RESULTS}")
    return "\n".join(lines)


def plot_compare(summary: dict, path: Path) -> Path:
    """The looped model's loss against loops, with each baseline's loss as a horizontal band (± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    looped = summary["rows"][0]
    xs = [int(t) for t in looped["loss_by_loops"]]
    ax.plot(xs, list(looped["loss_by_loops"].values()), marker="o", label=f"looped (lr {looped['lr']:g})")
    for r, color in zip(summary["rows"][1:], ("tab:orange", "tab:green"), strict=True):
        if r["loss"] is None:
            continue
        ax.axhline(r["loss"], color=color, label=f"{r['model']} (lr {r['lr']:g})")
        ax.axhspan(r["loss"] - r["loss_std"], r["loss"] + r["loss_std"], color=color, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T at test time (looped model)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"budget {summary['budget']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
