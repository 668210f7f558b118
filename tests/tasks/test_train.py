"""A tiny looped encoder learns small prefix sums in seconds; evaluation tables have the right shape."""

from __future__ import annotations

import json
import math

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
    init = f"train.init_from={tmp_path / 'run' / 'final'}"
    more = load_config(["debug"], [*SETS, "train.steps=1", init, f"train.out={tmp_path / 'more'}"])
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
        ["debug"],
        [
            *SETS,
            "train.steps=1",
            "optim.lr=1e-12",
            "optim.muon_lr=1e-12",
            f"train.init_from={src / 'final'}",
            f"train.out={tmp_path / 'par'}",
        ],
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
    # fewer test problems per size: every accuracy is a multiple of 1/3
    assert (
        main(["eval", str(out / "final"), "--loops", "1,2", "--sizes", "8", "--problems", "3", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == 3
    assert all(abs(3 * a - round(3 * a)) < 1e-9 for a in result["table"]["8"].values())
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


def small_task_config(out, *sets: str):
    """prefix sums at width 32, 10 steps, a checkpoint every 4: a task run of about a second."""
    base = ["model.width=32", "model.n_heads=2", "loops.mean_loops=3", "loops.backprop_loops=2"]
    base += ["optim.lr=3e-3", "optim.warmup_steps=2", "train.steps=10", "train.global_batch=8"]
    base += ["train.checkpoint_every=4", "train.keep_checkpoints=5", f"train.out={out}"]
    return load_config(["debug"], [*base, *sets])


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The log and final weights of a task run that nothing interrupts."""
    out = tmp_path_factory.mktemp("task-full") / "run"
    _, log = train_task(small_task_config(out), "prefix_sums", 4, say=lambda m: None)
    return log, weights(out / "final")


def stop_at_call(monkeypatch, n: int, action) -> dict[str, int]:
    """Make the n-th micro-batch forward (1-based) run `action` first: a kill or a signal. Returns the
    count of forwards so far, {"n": ...}."""
    from looped.train import step as train_step

    real, calls = train_step._forward_loss, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step, "_forward_loss", forward)
    return calls


def kill() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["killed", "sigterm"])
def test_task_training_stopped_midway_resumes_to_the_same_result(tmp_path, monkeypatch, uninterrupted, how):
    """Killed in step 7 (resumes from the step-4 checkpoint), or sent SIGTERM in step 6 (checkpoints step 6
    and stops); either way --resume finishes with the log and weights of the run nobody stopped."""
    import signal

    from looped.config import ConfigError
    from looped.train.state import TrainingStopped, checkpoints

    out = tmp_path / "run"
    cfg = small_task_config(out)
    if how == "killed":
        stop_at_call(monkeypatch, 7, kill)
        with pytest.raises(KeyboardInterrupt):
            train_task(cfg, "prefix_sums", 4, say=lambda m: None)
        assert [p.name for p in checkpoints(out)] == ["step_0000004", "step_0000000"]
    else:
        stop_at_call(monkeypatch, 6, lambda: signal.raise_signal(signal.SIGTERM))
        with pytest.raises(TrainingStopped, match="stopped at step 6"):
            train_task(cfg, "prefix_sums", 4, say=lambda m: None)
        assert [p.name for p in checkpoints(out)] == ["step_0000006", "step_0000004", "step_0000000"]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert not (out / "final").exists()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--resume"):
        train_task(cfg, "prefix_sums", 4, say=lambda m: None)
    lines = []
    _, log = train_task(cfg, "prefix_sums", 4, say=lines.append, resume=True)
    assert any("resumed from" in line for line in lines)
    full_log, full_weights = uninterrupted

    def drop_time(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert drop_time(log) == drop_time(full_log)  # every step 0..9, the same losses and scores
    assert [r["step"] for r in log] == list(range(10))
    resumed = weights(out / "final")
    assert resumed.keys() == full_weights.keys()
    for name, tensor in full_weights.items():
        assert torch.equal(resumed[name], tensor), name
    # resuming a finished run changes nothing and gives the same log back
    _, again = train_task(cfg, "prefix_sums", 4, say=lambda m: None, resume=True)
    assert drop_time(again) == drop_time(full_log)


def test_task_run_without_out_stopped_by_a_signal_says_nothing_was_kept(tmp_path, monkeypatch):
    """With train.out unset the checkpoints live in a scratch directory removed at the end: a stopped run
    says nothing was kept, rather than pointing --resume at a directory that no longer exists."""
    import signal
    import tempfile

    from looped.train.state import TrainingStopped

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the scratch directory goes
    cfg = small_task_config("")
    assert not cfg.train.out
    stop_at_call(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(TrainingStopped) as stopped:
        train_task(cfg, "prefix_sums", 4, say=lambda m: None)
    message = str(stopped.value)
    assert "stopped at step 2" in message and "nothing was kept" in message and "train.out" in message
    assert "looped-task-" not in message and "continues with --resume" not in message
    assert list(tmp_path.glob("looped-task-*")) == []  # the scratch directory is gone, as the message says


def test_task_resume_refuses_another_tasks_run(tmp_path):
    from looped.config import ConfigError

    cfg = small_task_config(tmp_path / "run", "train.steps=1")
    train_task(cfg, "prefix_sums", 4, say=lambda m: None)
    with pytest.raises(ConfigError, match="task prefix_sums, not parity"):
        train_task(cfg, "parity", 4, say=lambda m: None, resume=True)


def test_task_non_finite_steps_roll_back_then_give_up(tmp_path, monkeypatch):
    """As in `looped train`: NaN losses skip steps, max_bad_steps in a row roll back to the last checkpoint
    at a lower rate, and a run that keeps diverging stops with TrainingError."""
    from looped.train import step as train_step
    from looped.train.state import TrainingError

    real, calls = train_step._forward_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if 6 <= calls["n"] <= 8:  # steps 5, 6 and 7 (0-based) give NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_step, "_forward_loss", poisoned)
    lines = []
    cfg = small_task_config(tmp_path / "run", "train.max_bad_steps=3")
    model, log = train_task(cfg, "prefix_sums", 4, say=lines.append)
    assert sum("non-finite loss; step skipped" in line for line in lines) == 3
    assert any("rolled back to step 4 with the learning rate × 0.5" in line for line in lines)
    assert [r["step"] for r in log] == list(range(10))  # records after step 4 were redone, not doubled
    assert all(math.isfinite(r["loss"]) for r in log)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    def always_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_step, "_forward_loss", always_nan)
    cfg = small_task_config(tmp_path / "diverges", "train.max_bad_steps=2", "train.max_rollbacks=1")
    with pytest.raises(TrainingError, match="diverges"):
        train_task(cfg, "prefix_sums", 4, say=lambda m: None)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_task_training_honours_precision_and_device(tmp_path, monkeypatch):
    from looped.train import step as train_step

    real, seen = train_step._forward_loss, []

    def spy(model, x, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), x.device.type))
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(train_step, "_forward_loss", spy)
    cfg = small_task_config(tmp_path / "bf16", "train.steps=2", "train.precision=bf16", "train.device=cpu")
    train_task(cfg, "prefix_sums", 4, say=lambda m: None)
    assert seen == [(True, "cpu")] * 2
    seen.clear()
    train_task(small_task_config(tmp_path / "fp32", "train.steps=1"), "prefix_sums", 4, say=lambda m: None)
    assert seen == [(False, "cpu")]  # auto on a CPU: fp32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_task(small_task_config(tmp_path / "gpu", "train.device=cuda"), "prefix_sums", 4)


def test_a_killed_curriculum_resumes_stage_by_stage(tmp_path, monkeypatch):
    """Killed in the second stage, a curriculum resumed keeps its finished first stage (restored from that
    stage's last checkpoint, not retrained) and ends as the uninterrupted curriculum does."""
    from looped.tasks.train import train_curriculum

    stages = [(4, 4), (6, 6)]

    def say(message: str) -> None:
        pass

    _, full = train_curriculum(
        small_task_config(tmp_path / "full", "train.steps=4"), "prefix_sums", stages, say
    )
    cfg = small_task_config(tmp_path / "cur", "train.steps=4")
    stop_at_call(monkeypatch, 7, kill)  # the third step of the second stage
    with pytest.raises(KeyboardInterrupt):
        train_curriculum(cfg, "prefix_sums", stages, say)
    monkeypatch.undo()
    calls = stop_at_call(monkeypatch, 1000, kill)  # only counts
    _, log = train_curriculum(cfg, "prefix_sums", stages, say, resume=True)
    assert calls["n"] == 4  # stage 2 from its step-0 checkpoint; stage 1 not retrained
    assert log == [{**r, "seconds": log[i]["seconds"]} for i, r in enumerate(full)]
    a, b = weights(tmp_path / "cur" / "final"), weights(tmp_path / "full" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
