"""`looped finetune` and `looped retrofit`: training from a checkpoint at another depth."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny, train_config

from looped.checkpoint import CheckpointError, load, load_config_dir
from looped.cli import main
from looped.model.looped import LoopedLM
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
