"""The training commands end to end: data prepare → train → eval → generate, and their one-line errors."""

from __future__ import annotations

import json

import pytest
from helpers import train_config, write_corpus

from looped.cli import main
from looped.config import to_toml


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepare a tiny corpus with a small BPE and train on it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    text = write_corpus(root / "text")
    assert (
        main(["data", "prepare", str(text), str(root / "tokens"), "--vocab-size", "300", "--no-progress"])
        == 0
    )
    cfg = train_config(root / "tokens", root / "run", model={"vocab_size": 300}, train={"steps": 6})
    (root / "run.toml").write_text(to_toml(cfg))
    assert main(["train", "--config", str(root / "run.toml"), "--set", "train.tensorboard=true"]) == 0
    return root


def test_train_writes_metrics_tensorboard_and_final(run, capsys):
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"tokens_per_s", "gflops", "rho", "state_norms", "mean_loops", "lr"} <= set(steps[0])
    assert 0 < steps[0]["rho"] < 1
    assert any("val_loss" in r for r in records)
    assert list((run / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "run" / "final" / "tokenizer.json").is_file()


def test_eval_table_json_and_plot(run, capsys):
    final = str(run / "run" / "final")
    assert main(["eval", final, "--loops", "1,2,3", "--plot", str(run / "loss.png")]) == 0
    out = capsys.readouterr().out
    assert "loops" in out and "ppl" in out and out.count("\n") >= 5
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", final, "--loops", "1,4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in result["rows"]] == [1, 4]
    assert all(r["perplexity"] > 1 for r in result["rows"])


def test_generate_at_several_loop_counts(run, capsys):
    final = str(run / "run" / "final")
    args = ["generate", final, "--prompt", "the cat", "--loops", "1,3", "--max-new-tokens", "12", "--json"]
    assert main(args) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in records] == [1, 3]
    assert all(isinstance(r["text"], str) and r["tokens"] <= 12 for r in records)
    # Same seed, same loops → same text.
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in again] == [r["text"] for r in records]


def one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_clear_errors(run, tmp_path, capsys):
    one_line_error(capsys, ["data", "prepare", str(tmp_path / "missing"), str(tmp_path / "o")], "missing")
    one_line_error(capsys, ["data", "prepare", "shakspeare", str(tmp_path / "o")], "shakespeare")
    cfg = train_config(tmp_path / "no-data", tmp_path / "r")
    (tmp_path / "bad.toml").write_text(to_toml(cfg))
    one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.toml")], "looped data prepare")
    one_line_error(
        capsys, ["train", "--config", str(tmp_path / "bad.toml"), "--set", "loops.sampler=poison"], "poisson"
    )
    one_line_error(
        capsys, ["train", "--config", str(tmp_path / "bad.toml"), "--set", "optim.lrr=1"], "optim.lr"
    )
    # An existing run is not silently overwritten.
    one_line_error(capsys, ["train", "--config", str(run / "run.toml")], "--resume")
    one_line_error(capsys, ["eval", str(tmp_path)], "not a looped checkpoint")
