"""`looped finetune` and `looped retrofit`: training from a checkpoint at another depth."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import randomize_, tiny, train_config

from looped.checkpoint import CheckpointError, load, load_config_dir
from looped.cli import main
from looped.model.lm import LoopedLM
from looped.science.transfer import retrofit_model
from looped.train.trainer import train


def test_finetune_starts_from_the_checkpoint_at_another_depth(trained, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = [
        "finetune",
        str(trained),
        "--set",
        "loops.mean_loops=8",
        "--set",
        "train.steps=3",
        "--set",
        f"train.out={out}",
    ]
    assert main(argv) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    cfg = load_config_dir(out / "final")
    assert (
        cfg.loops.mean_loops == 8
        and cfg.train.init_from == str(trained)
        and cfg.model == load_config_dir(trained).model
    )
    # the first logged loss is the trained model's, far below a fresh model's
    first = float((out / "metrics.jsonl").read_text().splitlines()[0].split('"loss": ')[1].split(",")[0])
    assert first < 3.0


def test_retrofit_copies_first_middle_and_last_layers():
    standard = randomize_(LoopedLM(tiny(core_layers=0, prelude_layers=3, coda_layers=3, value_embeds=True)))
    layers = [*standard.prelude, *standard.coda]
    looped = retrofit_model(standard, 1, 2, 1, loops=4)
    assert (looped.cfg.prelude_layers, looped.cfg.core_layers, looped.cfg.coda_layers, looped.cfg.loops) == (
        1,
        2,
        1,
        4,
    )
    pairs = [
        (looped.prelude[0], layers[0]),
        (looped.core[0], layers[2]),
        (looped.core[1], layers[3]),
        (looped.coda[0], layers[5]),
    ]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.attn.wq.weight, theirs.attn.wq.weight, rtol=0, atol=0)
        torch.testing.assert_close(mine.mlp.w_out.weight, theirs.mlp.w_out.weight, rtol=0, atol=0)
    torch.testing.assert_close(looped.embed.weight, standard.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(looped.readout.weight, torch.eye(looped.cfg.width), rtol=0, atol=0)
    looped.eval()(torch.zeros(1, 5, dtype=torch.long))  # builds and runs
    with pytest.raises(CheckpointError, match="at most the standard model's 6 layers"):
        retrofit_model(standard, 3, 3, 3, loops=2)
    with pytest.raises(CheckpointError, match="needs a standard model"):
        retrofit_model(looped, 1, 1, 1, loops=2)


def test_retrofit_trains_a_standard_checkpoint_with_loop_sampling(trained, tmp_path, capsys):
    data = load_config_dir(trained).data.path
    cfg = train_config(
        data,
        tmp_path / "std",
        model={"core_layers": 0, "prelude_layers": 2, "coda_layers": 2},
        train={"steps": 4},
    )
    std = train(cfg).final
    out = tmp_path / "retro"
    argv = [
        "retrofit",
        str(std),
        "--layers",
        "1,2,1",
        "--set",
        "loops.mean_loops=3",
        "--set",
        "train.steps=3",
        "--set",
        f"train.out={out}",
    ]
    assert main(argv) == 0
    model = load(out / "final")
    assert model.cfg.core_layers == 2 and load_config_dir(out / "final").train.init_from == str(
        out / "retrofit-init"
    )
    assert main(["retrofit", str(std), "--layers", "1,2"]) == 2
    assert "prelude,core,coda" in capsys.readouterr().err


STUDY_SETS = [
    "model.vocab_size=256",
    "model.width=32",
    "loops.mean_loops=2",
    "data.seq_len=32",
    "train.global_batch=4",
    "train.checkpoint_every=100",
    "optim.warmup_steps=0",
    "eval.max_windows=4",
]


def test_study_transfer(data, tmp_path, capsys):
    """Every phase runs, fine-tunes start from the μ₀ model, the retrofit from the standard one, and a rerun
    trains nothing."""
    from looped.science.transfer import format_transfer, study_transfer

    out = tmp_path / "transfer"
    sets = [f"data.path={data}", *STUDY_SETS]
    summary = study_transfer(
        ["debug"],
        sets,
        4 * 128,
        2 * 128,
        [1, 3],
        [1e-3, 3e-3],
        out,
        eval_windows=4,
        parallel=2,
        say=lambda m: None,
    )
    assert summary["mus"] == [1, 2, 3]  # μ₀ = 2 joins the list
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {r["run"]: r for r in records}
    assert len(runs) == 3 * 2 + 2 + 3 + 2  # scratch μ × lr, standard × lr, fine-tunes, retrofit + control
    assert {r["phase"] for r in records} == {"scratch", "standard", "finetune", "retrofit", "scratch-short"}
    assert not runs["standard_lr0.001"]["looped"] and runs["retrofit_mu2"]["looped"]
    assert runs["scratch_mu3_lr0.001"]["mean_loops"] == 3 and runs["finetune_mu3"]["from_mu"] == 2
    # fine-tunes and the retrofit start from the right weights, with their own data order
    best = summary["best_lr"]
    for name, source in (
        ("finetune_mu1", out / f"scratch_mu2_lr{best['2']:g}" / "final"),
        ("retrofit_mu2", out / "retrofit-init"),
    ):
        cfg = load_config_dir(out / name / "final")
        assert cfg.train.init_from == str(source) and cfg.train.seed == 1
    assert load_config_dir(out / "retrofit-init").model.core_layers == 2  # debug: prelude/core/coda 1/2/1
    assert runs["scratch-short_mu2"]["tokens"] == runs["retrofit_mu2"]["tokens"] == 2 * 128
    assert runs["scratch_mu2_lr0.001"]["tokens"] == 4 * 128
    assert set(summary["lr_grid"]) == {"μ=1", "μ=2", "μ=3", "standard"}
    assert all(len(g) == 2 for g in summary["lr_grid"].values())
    assert [r["mu"] for r in summary["rows"]] == [1, 2, 3] and all(r["finetuned"] for r in summary["rows"])
    assert summary["retrofit"]["retrofit"] is not None and summary["retrofit"]["source_standard"] is not None
    assert sorted(int(t) for t in summary["curves"]["fine-tuned 2→3"]) == [1, 2, 3, 4, 6, 8, 16]
    assert (out / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    text = format_transfer(summary)
    assert "retrofit at μ₀=2" in text and "standard" in text
    # the CLI resumes the same directory without rerunning anything, and prints the table on stdout
    lines = (out / "results.jsonl").read_text()
    argv = ["study", "transfer", "--preset", "debug", "--budget", "tokens=512", "--finetune-tokens", "256"]
    argv += ["--mus", "1,3", "--lrs", "1e-3,3e-3", "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    assert (out / "results.jsonl").read_text() == lines
    printed = capsys.readouterr().out
    assert "retrofit at μ₀=2" in printed and "tuned 2→μ" in printed
    assert format_transfer(summary) in printed  # the whole table, as the library formats it
    assert not re.search(r"^\[\d+/\d+\] ", printed, re.MULTILINE)  # no "[n/N] run: loss …": nothing trained
    assert main(["report", str(out)]) == 0
    assert "Transfer across loop depths" in (out / "report.html").read_text()


def test_study_transfer_bad_input(capsys):
    base = ["study", "transfer", "--preset", "debug", "--lrs", "1e-3", "--out", "/tmp/never"]
    assert main([*base, "--budget", "flops=1e12"]) == 2
    assert "tokens=N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse checks the loop counts
        main([*base, "--budget", "tokens=1e3", "--mus", "0,2"])
    assert e.value.code == 2 and "≥ 1" in capsys.readouterr().err
