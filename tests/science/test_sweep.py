"""`looped sweep`: a grid of runs into results.jsonl, resumable, commands for torchrun or Slurm, clear errors."""

from __future__ import annotations

import json

import pytest

from looped.cli import main
from looped.config import ConfigError
from looped.science.sweep import format_table, load_grid, run_sweep, set_lr

GRID = """
[sweep]
base = ["debug"]
set = ["data.path={data}", "data.seq_len=32", "model.vocab_size=256", "model.width=32", "train.global_batch=4",
       "train.checkpoint_every=100", "eval.every=0", "eval.loops=[1]", "optim.warmup_steps=1"]
out = "{out}"
seeds = [0]
eval_loops = [1, 2, 4]
eval_windows = 4
parallel = 2

[grid]
"loops.mean_loops" = [1.0, 2.0]
"train.steps" = [3, 6]
"""


def write_grid(tmp_path, data, text=GRID):
    path = tmp_path / "grid.toml"
    path.write_text(text.format(data=data, out=tmp_path / "sweep"))
    return path


def test_sweep_runs_the_grid_and_skips_what_finished(data, tmp_path):
    grid = write_grid(tmp_path, data)
    messages: list[str] = []
    results = run_sweep(grid, say=messages.append)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 4 * 3  # 4 runs × 3 evaluated loop counts
    runs = {r["run"] for r in records}
    assert len(runs) == 4 and all(r.endswith("seed0") for r in runs)
    for r in records:
        assert r["tokens"] == r["grid"]["train.steps"] * 4 * 32
        assert r["flops"] > 0 and r["params"] > 0 and r["loss"] > 0
        assert r["unrolled_params"] >= r["params"] and r["mean_loops"] == r["grid"]["loops.mean_loops"]
    more = [r for r in records if r["grid"]["train.steps"] == 6]
    less = [r for r in records if r["grid"]["train.steps"] == 3]
    assert sum(r["flops"] for r in more) > sum(r["flops"] for r in less)
    # The records are what `looped fit` reads: the per-run test-time law fits the looped runs.
    from looped.science.fits import fit_results

    fit = fit_results(results, bootstrap_samples=10)
    assert len(fit.records) == 12
    assert set(fit.laws["test_time"]["runs"]) == runs
    # Run again: nothing is re-run and nothing is added.
    before = results.read_text()
    messages.clear()
    run_sweep(grid, say=messages.append)
    assert results.read_text() == before and "4 done, 0 to run" in messages[0]


def test_sweep_writes_commands_for_torchrun_and_slurm(data, tmp_path):
    grid = write_grid(tmp_path, data)
    script = run_sweep(grid, commands="torchrun")
    text = script.read_text()
    assert text.count("torchrun --nproc_per_node") == 4 and "--resume" in text and "sweep" in text
    assert all((tmp_path / "sweep" / name / "config.toml").is_file() for name, _ in load_grid(grid).runs())
    sbatch = run_sweep(grid, commands="slurm").read_text()
    assert "#SBATCH --array=0-3" in sbatch
    assert not (tmp_path / "sweep" / "results.jsonl").exists()  # nothing ran


def test_variants_are_named_bundles_times_the_grid(data, tmp_path):
    """[variants]: each bundle of overrides times the grid and the seeds; the run names and records carry
    the variant, and a variant's key is overridden by the grid's."""
    text = GRID.replace('"loops.mean_loops" = [1.0, 2.0]\n', "") + (
        "\n[variants]\nplain = []\n"
        'additive = ["model.injection=\\"additive\\"", "model.readout=false", "train.steps=99"]\n'
    )
    grid = load_grid(write_grid(tmp_path, data, text))
    names = [n for n, _ in grid.runs()]
    assert names == [
        "plain_steps3_seed0",
        "plain_steps6_seed0",
        "additive_steps3_seed0",
        "additive_steps6_seed0",
    ]
    cfg = grid.config(*grid.runs()[2])
    assert cfg.model.injection == "additive" and not cfg.model.readout and cfg.train.steps == 3
    assert grid.config(*grid.runs()[0]).model.injection == "diagonal"
    assert [grid.variant_of(n) for n in names] == ["plain", "plain", "additive", "additive"]
    records = [json.loads(line) for line in run_sweep(grid.path, say=lambda m: None).read_text().splitlines()]
    assert {(r["variant"], r["grid"]["train.steps"]) for r in records} == {
        ("plain", 3),
        ("plain", 6),
        ("additive", 3),
        ("additive", 6),
    }
    table = format_table(records[::-1], names).splitlines()  # the grid's order, whatever finished first
    assert table[0].split() == ["run", "seeds", "T=1", "T=2", "T=4"]
    assert [line.split()[0] for line in table[1:]] == [
        "plain_steps3",
        "plain_steps6",
        "additive_steps3",
        "additive_steps6",
    ]
    row = table[1].split()
    losses = [r["loss"] for r in records if r["run"] == "plain_steps3_seed0"]
    assert row[1] == "1" and sum(c.startswith("[") for c in row[2:]) == 1
    assert f"[{min(losses):.3f}]" in row
    two = [dict(r, seed=1, loss=r["loss"] + 0.1) for r in records] + records
    assert "±0.071" in format_table(two)  # the standard deviation of two seeds 0.1 apart
    bad = tmp_path / "bad.toml"
    bad.write_text('[variants]\nx = ["model.width"]\n')
    with pytest.raises(ConfigError, match="variants.x must be a list"):
        load_grid(bad)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[sweep]\nbase = ['debug']\n", "[grid] is empty"),
        ("[grid]\nwidth = [1]\n", "must be section.key"),
        ("[grid]\n'model.width' = 64\n", "non-empty list"),
        ("[grid]\n'model.widht' = [64]\n", "did you mean 'width'"),
        ("[sweep]\nparalel = 2\n[grid]\n'model.width' = [64]\n", "unknown key sweep.paralel"),
        ("[grid\n", "not valid TOML"),
    ],
)
def test_bad_grids_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match.replace("[", r"\[")):
        load_grid(path)


def test_cli_sweep_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "no such grid file" in err and err.count("\n") == 1


def test_shipped_grids_load():
    """Every grid in configs/grids/ parses and resolves each of its runs' configs."""
    from pathlib import Path

    from looped.science.sweep import load_grid

    grids = sorted((Path(__file__).parents[2] / "configs" / "grids").glob("*.toml"))
    assert grids
    for path in grids:
        assert load_grid(path).runs()


def test_a_grid_rate_scales_muons_rate_by_the_same_factor():
    tree = {"optim": {"optimizer": "muon", "lr": 1e-2, "muon_lr": 0.02}}
    set_lr(tree, 5e-3)
    assert tree["optim"]["lr"] == 5e-3 and tree["optim"]["muon_lr"] == pytest.approx(0.01)
    tree = {"optim": {"optimizer": "adamw", "lr": 1e-2, "muon_lr": 0.02}}
    set_lr(tree, 3e-2)
    assert tree["optim"] == {"optimizer": "adamw", "lr": 3e-2, "muon_lr": 0.02}
