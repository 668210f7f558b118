"""`looped study stability`: which injections train stably, and up to which learning rate.

Each variant — injection `diagonal` (Parcae), `linear` (Huginn) or `additive`, each with and without the
spectral-norm constraint on the injection and readout (additive has no injection matrix: readout only;
without a readout, the default, additive has no constrained variant) — trains for the same steps at every
learning rate of a grid, with the same data and seed. For each run: diverged or not (non-finite steps that roll-backs
could not cure), final loss, the largest loss spike (the most the logged loss rose above its running
minimum), the largest mean state norm after any loop, and ρ(Ā) at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from looped.config import ConfigError, from_dict, load_config
from looped.science.sweep import RESULTS, execute, finished_runs, read_results, set_lr

INJECTIONS = ("diagonal", "linear", "additive")
SPECTRAL = {"none": [], "spectral": ["injection", "readout"]}


def stability_run(
    cfg_tree: dict, name: str, extra: dict, eval_loops, eval_windows, threads: int
) -> list[dict]:
    """Train one variant; a divergence is a result here, not an error. Runs in a worker process."""
    import torch

    torch.set_num_threads(threads)
    from looped.config import from_dict
    from looped.train.trainer import TrainingError, train

    cfg = from_dict(cfg_tree)
    cfg.train.progress = False
    diverged, error = False, None
    try:
        result = train(cfg, resume=True)
        final = result.eval.get(max(result.eval), math.nan) if result.eval else math.nan
    except TrainingError as e:
        diverged, error, final = True, str(e), math.nan
    metrics = Path(cfg.train.out) / "metrics.jsonl"
    losses, norms, rho = [], [], math.nan
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and math.isfinite(rec["loss"]):
                losses.append(rec["loss"])
            if rec.get("state_norms"):
                norms += [n for n in rec["state_norms"] if n is not None]
            if rec.get("rho") is not None:
                rho = rec["rho"]
    spike, low = 0.0, math.inf
    for v in losses:
        low = min(low, v)
        spike = max(spike, v - low)
    finite_norms = [n for n in norms if math.isfinite(n)]
    return [
        {
            "run": name,
            **extra,
            "diverged": diverged or not math.isfinite(final),
            "loss": final if math.isfinite(final) else math.inf,
            "train_loss": losses[-1] if losses else math.nan,
            "max_spike": spike,
            "max_state_norm": max(finite_norms) if finite_norms else math.nan,
            "state_norm_nonfinite": len(finite_norms) < len(norms),
            "rho": rho,
            "error": error,
        }
    ]


def study_stability(
    config: list[str],
    overrides: list[str],
    lrs: list[float],
    out: str | Path,
    parallel: int = 1,
    injections: tuple[str, ...] = INJECTIONS,
    say: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the grid of variants × learning rates; returns the table (also OUT/stability.json)."""
    if not lrs or min(lrs) <= 0:
        raise ConfigError("--lrs must be positive learning rates, e.g. 1e-3,3e-3,1e-2")
    base = load_config(config, overrides)
    if not base.model.looped:
        raise ConfigError("looped study stability needs a looped model (model.core_layers > 0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    done = finished_runs(results)
    jobs = []
    for inj in injections:
        for spectral, groups in SPECTRAL.items():
            for lr in lrs:
                name = f"{inj}_{spectral}_lr{lr:g}"
                tree = base.to_dict()
                # only what exists is bounded: additive injection has no matrix, a model may have no readout
                bound = [
                    g
                    for g in groups
                    if not (inj == "additive" and g == "injection") and (g != "readout" or base.model.readout)
                ]
                if groups and not bound:
                    continue
                tree["model"].update(injection=inj, spectral_norm=bound)
                set_lr(tree, lr)
                tree["train"].update(out=str(out / name), max_rollbacks=1)
                tree["eval"].update(every=0, loops=[max(1, round(base.loops.mean_loops))])
                jobs.append((name, from_dict(tree), {"injection": inj, "spectral": spectral, "lr": lr}))
    todo = [j for j in jobs if j[0] not in done]
    say(
        f"stability: {len(jobs)} runs (injections × spectral norm × {len(lrs)} learning rates), {len(todo)} to run"
    )
    execute(todo, results, parallel, [], 0, say, worker=stability_run)
    rows = read_results(results)
    names = {j[0] for j in jobs}
    rows = [r for r in rows if r["run"] in names]
    summary = {"lrs": lrs, "rows": rows}
    (out / "stability.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["plot"] = str(plot_stability(summary, out / "stability.png"))
    return summary


def format_stability(summary: dict) -> str:
    lines = [
        f"{'injection':<10} {'constraint':<9} {'lr':>8} {'diverged':>8} {'val loss':>9} {'max spike':>9} "
        f"{'max ‖h‖':>9} {'ρ(Ā)':>7}"
    ]
    order = {v: i for i, v in enumerate(INJECTIONS)}
    for r in sorted(summary["rows"], key=lambda r: (order.get(r["injection"], 9), r["spectral"], r["lr"])):
        loss = "-" if not math.isfinite(r["loss"]) else f"{r['loss']:.4f}"
        lines.append(
            f"{r['injection']:<10} {r['spectral']:<9} {r['lr']:>8.2g} {'yes' if r['diverged'] else 'no':>8} "
            f"{loss:>9} {r['max_spike']:>9.3f} {r['max_state_norm']:>9.1f} {r['rho']:>7.3f}"
        )
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def plot_stability(summary: dict, path: Path) -> Path:
    """Heat map: variants × learning rates, colour = validation loss, ✕ = diverged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lrs = sorted(summary["lrs"])
    variants = [(i, s) for i in INJECTIONS for s in SPECTRAL]
    variants = [v for v in variants if any((r["injection"], r["spectral"]) == v for r in summary["rows"])]
    grid = np.full((len(variants), len(lrs)), np.nan)
    crossed = []
    for r in summary["rows"]:
        if (r["injection"], r["spectral"]) not in variants or r["lr"] not in lrs:
            continue
        y, x = variants.index((r["injection"], r["spectral"])), lrs.index(r["lr"])
        if r["diverged"]:
            crossed.append((x, y))
        else:
            grid[y, x] = r["loss"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lrs) + 3, 0.5 * len(variants) + 1.8), dpi=120)
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for x, y in crossed:
        ax.text(x, y, "✕", ha="center", va="center", color="red", fontsize=14)
    for y in range(len(variants)):
        for x in range(len(lrs)):
            if np.isfinite(grid[y, x]):
                ax.text(x, y, f"{grid[y, x]:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(variants)), [f"{i} / {s}" for i, s in variants])
    ax.set_xlabel("learning rate")
    ax.set_title("validation loss (✕ = diverged)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
