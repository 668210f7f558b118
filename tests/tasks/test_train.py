"""A tiny looped encoder learns small prefix sums in seconds; evaluation tables have the right shape."""

from __future__ import annotations

import pytest
import torch

from looped.checkpoint import load
from looped.config import ConfigError, load_config
from looped.tasks.train import evaluate_task, format_task_table, train_task

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


def test_task_training_needs_a_looped_model():
    cfg = load_config(["debug"], ["model.core_layers=0", "train.steps=1"])
    with pytest.raises(ConfigError, match="looped model"):
        train_task(cfg, "parity", 4, say=lambda m: None)


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
    assert main(["eval", str(out / "final"), "--task", "sudoku"]) == 2
    assert "unknown task" in capsys.readouterr().err
