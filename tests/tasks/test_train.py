"""A tiny looped encoder learns small prefix sums in seconds; evaluation tables have the right shape."""

from __future__ import annotations

import json

import pytest
import torch

from looped.checkpoint import load
from looped.config import load_config
from looped.tasks.train import (
    baseline_config,
    evaluate_task,
    format_task_table,
    parse_sizes,
    step_size,
    train_task,
)

SETS = [
    "model.width=48",
    "model.n_heads=4",
    "model.prelude_layers=1",
    "model.core_layers=1",
    "model.coda_layers=1",
    "loops.mean_loops=6",
    "loops.backprop_loops=3",
    "optim.lr=5e-3",
    "optim.warmup_steps=10",
    "train.steps=400",
    "train.global_batch=32",
]


def test_tiny_model_learns_small_prefix_sums(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(["debug"], [*SETS, f"train.out={tmp_path / 'run'}"])
    model, log = train_task(cfg, "prefix_sums", 6, say=lambda m: None)
    assert log[-1]["loss"] < 0.2 < log[0]["loss"]
    table = evaluate_task(model, "prefix_sums", [6, 12], [1, 6, 12], n=128)
    assert list(table) == [6, 12] and all(list(row) == [1, 6, 12] for row in table.values())
    assert table[6][6] >= 0.9  # whole-sequence exact match at the training size
    text = format_task_table(table, "bits")
    assert text.count("\n") == 2 and "T=12" in text
    saved = load(tmp_path / "run" / "final")
    assert not saved.cfg.causal and saved.cfg.vocab_size == 2
    assert evaluate_task(saved, "prefix_sums", [6], [6], n=128) == {6: {6: table[6][6]}}
    # a curriculum step starts from those weights: its first logged loss is the trained model's
    more = load_config(["debug"], [*SETS, "train.steps=1", f"train.init_from={tmp_path / 'run' / 'final'}"])
    _, again = train_task(more, "prefix_sums", 6, say=lambda m: None)
    assert again[0]["loss"] < 0.2


def test_size_ranges_and_the_baseline_config():
    assert parse_sizes("20") == (20, 20) and parse_sizes("2:20") == (2, 20)
    for bad in ("0", "9:3", "a:b"):
        with pytest.raises(ValueError, match="--size"):
            parse_sizes(bad)
    drawn = {step_size("parity", (2, 20), 0, step) for step in range(200)}
    assert drawn == set(range(2, 21))  # every size in the range, none outside
    assert {step_size("mazes", (5, 11), 0, step) for step in range(100)} == {5, 7, 9, 11}
    cfg = load_config(["prefix-sums"], [])
    base = baseline_config(cfg)
    assert not base.model.looped and base.model.n_layers == 3 == cfg.model.n_layers
    assert base.model.attn_window == cfg.model.attn_window


def test_curriculum_from_prefix_sums_to_parity_grows_the_vocabulary(tmp_path):
    """init_from a model with fewer tokens: the shared rows are copied, the query token keeps its init."""
    src = tmp_path / "ps"
    cfg = load_config(["debug"], [*SETS, "train.steps=2", f"train.out={src}"])
    ps, _ = train_task(cfg, "prefix_sums", 4, say=lambda m: None)
    more = load_config(
        ["debug"], [*SETS, "train.steps=1", "optim.lr=1e-12", f"train.init_from={src / 'final'}"]
    )
    par, _ = train_task(more, "parity", (2, 6), say=lambda m: None)
    assert par.embed.weight.shape[0] == 4 and ps.embed.weight.shape[0] == 2
    assert torch.allclose(par.embed.weight[:2], ps.embed.weight, atol=1e-6)
    assert torch.allclose(par.head.weight[:2], ps.head.weight, atol=1e-6)
    assert torch.allclose(par.core[0].attn.wq.weight, ps.core[0].attn.wq.weight, atol=1e-6)


def test_cli_train_and_eval_a_task(tmp_path, capsys):
    import json

    from looped.cli import main

    out = tmp_path / "parity"
    sets = [
        "model.width=32",
        "train.steps=5",
        "train.global_batch=8",
        f"train.out={out}",
        "loops.mean_loops=2",
    ]
    argv = ["train", "--preset", "debug", "--task", "parity", "--size", "4"]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    assert "T=1" in capsys.readouterr().out
    plot = tmp_path / "acc.png"
    assert (
        main(["eval", str(out / "final"), "--loops", "1..8", "--sizes", "4,8", "--json", "--plot", str(plot)])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "parity" and result["train_size"] == 4  # the task comes from the checkpoint
    assert set(result["table"]) == {"4", "8"} and set(result["table"]["8"]) == {"1", "2", "4", "8"}
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # the non-looped baseline trains with the same command and shows as a column of its own
    base = tmp_path / "base"
    argv = ["train", "--preset", "debug", "--task", "parity", "--size", "2:4", "--baseline"]
    assert main([*argv, *[a for s in [*sets[:-2], f"train.out={base}"] for a in ("--set", s)]]) == 0
    assert "T=1" in capsys.readouterr().out
    assert load(base / "final").cfg.core_layers == 0
    argv = ["eval", str(out / "final"), "--loops", "1,2", "--sizes", "4,8", "--baseline", str(base / "final")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[-1] == "baseline" and len(lines) == 3 and lines[2].endswith("%")
    assert main(["eval", str(out / "final"), "--loops", "1", "--baseline", str(out / "final")]) == 2
    assert "looped model" in capsys.readouterr().err
    assert main(["eval", str(out / "final"), "--task", "sudoku"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_a_curriculum_trains_stage_after_stage(tmp_path):
    from looped.checkpoint import load_config_dir
    from looped.tasks.train import parse_stages, train_curriculum

    assert parse_stages("16,32") == [(16, 16), (32, 32)] and parse_stages("2:8, 4:20") == [(2, 8), (4, 20)]
    out = tmp_path / "cur"
    cfg = load_config(["debug"], [*SETS, "train.steps=2", f"train.out={out}"])
    lines = []
    _, log = train_curriculum(cfg, "prefix_sums", [(4, 4), (8, 8)], say=lines.append)
    assert [rec["stage"] for rec in log] == [0, 0, 1, 1]
    second = load_config_dir(out / "stage-1-size-8" / "final")
    assert second.train.init_from == str(out / "stage-0-size-4" / "final")  # each stage starts from the last
    assert second.loops.mean_loops == 2 * cfg.loops.mean_loops  # μ grows with the size
    assert json.loads((out / "final" / "run.json").read_text())["train_size"] == 8
    assert any("stage 2/2" in line for line in lines)
