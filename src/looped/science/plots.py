"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from looped.science.fits import FitResult


def plot_loss_vs_loops(curves: dict[str, dict[float, float]], path: str | Path, title: str = "") -> Path:
    """Validation loss against loop count (log₂ axis), one line per labelled curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T at test time")
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_fits(fit: FitResult, out: str | Path) -> list[Path]:
    """`looped fit`'s plots of a `fit_results` result, into `out`: loss against loops per run with its
    test-time law (fit_test_time.png), the training law over tokens coloured by N(μ) (fit_training.png), and
    the unified law's predictions against the measurements (fit_unified.png); only those whose law was
    fitted. Returns the files written."""
    import matplotlib
    import numpy as np

    from looped.science.laws import TestTimeLaw, TrainingLaw, UnifiedLaw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    runs, fitted_tt, chosen = fit.runs, fit.test_time_fits, fit.training_points
    fitted_b, fitted_c = fit.training_fit, fit.unified_fit

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)

    if fitted_tt:  # (i) loss against loops, per looped run, with its fitted curve
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for i, (run, law) in enumerate(fitted_tt.items()):
            recs, color = runs[run], f"C{i % 10}"
            ax.plot([r["loops"] for r in recs], [r["loss"] for r in recs], "o", color=color, label=run)
            t = np.geomspace(1, max(r["loops"] for r in recs), 100)
            ax.plot(t, law.predict(loops=t), "-", color=color, alpha=0.7)
        ax.set(xscale="log", xlabel="loops T at test time", ylabel="validation loss (nats / token)")
        ax.set_xscale("log", base=2)
        ax.set_title(TestTimeLaw.formula)
        ax.grid(True, alpha=0.3)
        if len(fitted_tt) <= 12:
            ax.legend(fontsize=7)
        save(fig, "fit_test_time.png")

    if fitted_b is not None:  # (ii) loss against tokens, coloured by N(μ), with the law's curves
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        n = np.array([r["unrolled_params"] for r in chosen])
        norm = matplotlib.colors.LogNorm(n.min(), n.max() * 1.0001)
        cmap = matplotlib.colormaps["viridis"]
        sc = ax.scatter([r["tokens"] for r in chosen], [r["loss"] for r in chosen], c=n, cmap=cmap, norm=norm)
        d = np.geomspace(min(r["tokens"] for r in chosen), max(r["tokens"] for r in chosen), 100)
        levels = np.unique(n)
        for level in levels[
            np.unique(np.linspace(0, len(levels) - 1, min(8, len(levels))).round().astype(int))
        ]:
            ax.plot(d, fitted_b.predict(unrolled_params=level, tokens=d), color=cmap(norm(level)), alpha=0.8)
        fig.colorbar(sc, ax=ax, label="unrolled params N(μ)")
        ax.set(
            xscale="log", xlabel="training tokens D", ylabel="loss at T = round(μ)", title=TrainingLaw.formula
        )
        ax.grid(True, alpha=0.3)
        save(fig, "fit_training.png")

    if fitted_c is not None:  # (iii) the unified law's predictions against the measurements
        fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
        cols = fit.unified_columns()
        pred = np.asarray(fitted_c.predict(**cols))
        sc = ax.scatter(cols["loss"], pred, c=cols["loops"] / cols["mean_loops"], cmap="plasma", s=14)
        lo, hi = min(cols["loss"].min(), pred.min()), max(cols["loss"].max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        fig.colorbar(sc, ax=ax, label="T / μ")
        ax.set(xlabel="measured loss", ylabel="predicted loss", title=UnifiedLaw.formula)
        ax.grid(True, alpha=0.3)
        save(fig, "fit_unified.png")
    return written
