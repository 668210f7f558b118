"""`looped study stability`: every variant at every learning rate, divergence as a result, table and heat map."""

from __future__ import annotations

import json

from looped.cli import main
from looped.science.study import format_stability, study_stability

SETS = [
    "model.vocab_size=256",
    "model.width=32",
    "loops.mean_loops=3",
    "data.seq_len=32",
    "train.global_batch=4",
    "train.steps=6",
    "train.checkpoint_every=100",
    "train.max_bad_steps=2",
    "optim.warmup_steps=0",
    "optim.grad_clip=0",
    "eval.max_windows=4",
    "model.readout=true",  # the full grid: every injection constrained too
]


def test_stability_grid(data, tmp_path, capsys):
    out = tmp_path / "study"
    summary = study_stability(
        ["debug"], [f"data.path={data}", *SETS], [1e-3, 1e4], out, parallel=2, say=lambda m: None
    )
    rows = summary["rows"]
    assert len(rows) == 3 * 2 * 2
    assert {(r["injection"], r["spectral"]) for r in rows} == {
        (i, s) for i in ("diagonal", "linear", "additive") for s in ("none", "spectral")
    }
    calm = [r for r in rows if r["lr"] == 1e-3]
    assert not any(r["diverged"] for r in calm)
    assert all(r["loss"] > 0 and r["max_state_norm"] > 0 for r in calm)
    diag = [r for r in calm if r["injection"] == "diagonal"]
    assert all(0 < r["rho"] < 1 for r in diag)  # ρ(Ā) < 1 by construction
    assert all(r["rho"] == 1 for r in calm if r["injection"] == "additive")
    assert any(r["diverged"] for r in rows if r["lr"] == 1e4)  # an absurd rate breaks something
    assert (out / "stability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "stability.json").read_text())["lrs"] == [1e-3, 1e4]
    table = format_stability(summary)
    assert table.count("\n") == 12 + 1 and "diagonal" in table
    # the CLI resumes the same directory without rerunning anything
    lines = (out / "results.jsonl").read_text()
    argv = ["study", "stability", "--preset", "debug", "--lrs", "1e-3,1e4", "--out", str(out)]
    assert main([*argv, *[a for s in SETS + [f"data.path={data}"] for a in ("--set", s)]]) == 0
    assert (out / "results.jsonl").read_text() == lines
    assert "ρ(Ā)" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Stability of injections" in page and "data:image/png;base64," in page
    assert "![stability](stability.png)" in (out / "report.md").read_text()


def test_bad_learning_rates(capsys):
    assert main(["study", "stability", "--preset", "debug", "--lrs", "x", "--out", "/tmp/never"]) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_without_a_readout_additive_has_no_constrained_variant(data, tmp_path):
    sets = [f"data.path={data}", *SETS, "model.readout=false"]
    summary = study_stability(["debug"], sets, [1e-3], tmp_path / "study", say=lambda m: None)
    assert sorted((r["injection"], r["spectral"]) for r in summary["rows"]) == [
        ("additive", "none"),
        ("diagonal", "none"),
        ("diagonal", "spectral"),
        ("linear", "none"),
        ("linear", "spectral"),
    ]
