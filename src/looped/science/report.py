"""`looped report DIR`: one self-contained HTML page (plots embedded) and a Markdown twin with the tables
and plots of whatever DIR holds: a training run, a sweep (with its scaling-law fit), a comparison, a study."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from looped.science.sweep import RESULTS


def _sections(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """(title, preformatted text, plots) for every artifact found in `folder`."""
    out: list[tuple[str, str, list[Path]]] = []
    if (folder / "metrics.jsonl").is_file():
        out.append(_training(folder))
    if (folder / "compare.json").is_file():
        from looped.science.compare import format_compare

        summary = json.loads((folder / "compare.json").read_text())
        for row in summary["rows"]:
            row["loss_by_loops"] = {int(k): v for k, v in row["loss_by_loops"].items()}
            row["lr_grid"] = {float(k): v for k, v in row["lr_grid"].items()}
        out.append(("Looped against matched baselines", format_compare(summary), [folder / "compare.png"]))
    if (folder / "stability.json").is_file():
        from looped.science.study import format_stability

        summary = json.loads((folder / "stability.json").read_text())
        out.append(
            (
                "Stability of injections across learning rates",
                format_stability(summary),
                [folder / "stability.png"],
            )
        )
    if (folder / "transfer.json").is_file():
        from looped.science.transfer import format_transfer

        summary = json.loads((folder / "transfer.json").read_text())
        out.append(
            (
                "Transfer across loop depths and retrofitting",
                format_transfer(summary),
                [folder / "transfer.png"],
            )
        )
    results = folder / RESULTS
    if results.is_file() and not any(
        (folder / f).is_file() for f in ("compare.json", "stability.json", "transfer.json")
    ):
        from looped.science.fits import fit_results, format_fit
        from looped.science.plots import plot_fits

        fit = fit_results(results)
        plots = plot_fits(fit, folder / "fit")
        fit.plots = [str(p) for p in plots]
        out.append(("Scaling-law fits", format_fit(fit), plots))
    return out


def _training(folder: Path) -> tuple[str, str, list[Path]]:
    """A training run: its loss curve, validation sweeps and last logged state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    for r in evals[-1:]:
        for t, v in r["val_loss"].items():
            ax.scatter([r["step"]], [v], label=f"validation, {t} loops", zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "report_loss.png"
    fig.savefig(path)
    plt.close(fig)
    lines = [f"{len(train)} logged steps; last step {train[-1]['step'] if train else 0}"]
    if train:
        last = train[-1]
        lines.append(
            f"last: loss {last['loss']:.4f}, {last.get('tokens', 0):,} tokens, {last.get('tokens_per_s', 0):,.0f} tokens/s, "
            f"ρ(Ā) {last.get('rho') if last.get('rho') is not None else '-'}"
        )
    for r in evals:
        lines.append(
            f"step {r['step']}: validation " + "  ".join(f"T={t}: {v:.4f}" for t, v in r["val_loss"].items())
        )
    return (f"Training run {folder.name}", "\n".join(lines), [path])


def write_report(folder: str | Path) -> tuple[Path, Path]:
    """Write folder/report.html (self-contained) and folder/report.md; returns their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such directory")
    sections = _sections(folder)
    if not sections:
        raise ValueError(
            f"{folder}: nothing to report (no metrics.jsonl, compare.json, stability.json, transfer.json or {RESULTS})"
        )
    title = f"looped report: {folder}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    md = [f"# {title}", ""]
    for name, text, plots in sections:
        parts += [f"<h2>{html.escape(name)}</h2>", f"<pre>{html.escape(text)}</pre>"]
        md += [f"## {name}", "", "```", text, "```", ""]
        for plot in plots:
            if plot.is_file():
                data = base64.b64encode(plot.read_bytes()).decode()
                parts.append(f"<img alt='{html.escape(plot.name)}' src='data:image/png;base64,{data}'>")
                md += [f"![{plot.stem}]({plot.relative_to(folder)})", ""]
    parts.append("</body></html>")
    page, notes = folder / "report.html", folder / "report.md"
    page.write_text("\n".join(parts))
    notes.write_text("\n".join(md))
    return page, notes
