"""The two-stream model: its text examples say the right thing, each stream takes its own loop count, and
`looped eval` gives a grid over the two."""

from __future__ import annotations

import numpy as np
import torch
from helpers import SMALL_STREAM_SETS

from looped.config import load_config
from looped.tasks import multimodal as mm
from looped.tasks.generators import IGNORE
from looped.tasks.train import train_task

SETS = SMALL_STREAM_SETS


def test_examples_write_and_read_the_name():
    digits = np.array([7, 7, 3, 0])
    x, y = mm.examples(digits, write=np.array([True, False, False, True]), shown=np.array([7, 7, 8, 0]))
    assert mm.text_of(x[0].tolist()) == "[WRITE]seven"  # the targets are the inputs shifted by one
    assert mm.text_of([t for t in y[0].tolist() if t != IGNORE]) == "seven[END]"
    assert mm.text_of(x[1].tolist()) == "[READ]seven[ASK]"
    assert [t for t in y[1].tolist() if t != IGNORE] == [mm.YES]
    assert [t for t in y[2].tolist() if t != IGNORE] == [mm.NO]  # "eight" shown for a 3
    assert y[2, 6] == mm.NO and (y[2, :6] == IGNORE).all()  # asked at [ASK] only
    (images, text), targets = mm.batch("test", None, seed=0)
    n = len(mm.split_indices("test"))
    assert (
        images.shape == (2 * n, 1, 8, 8)
        and (text[:n, 0] == mm.WRITE).all()
        and (text[n:, 0] == mm.READ).all()
    )
    yes = (targets[n:] == mm.YES).any(dim=1).float().mean().item()
    assert 0.4 < yes < 0.6  # half the read examples show the right name


def test_each_stream_takes_its_own_loop_count():
    model = mm.TwoStreamModel(load_config(["vision"], SETS).model).eval()
    with torch.no_grad():  # output projections start at zero, which makes every loop count alike
        for name, p in model.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w_out.weight")):
                p.normal_(0, 0.05)
    (images, text), y = mm.batch("test", 6, seed=0)
    base = model((images, text), loops=(1, 1)).logits
    assert base.shape == (6, mm.TEXT_LEN, mm.VOCAB)
    assert not torch.allclose(base, model((images, text), loops=(4, 1)).logits)  # vision loops matter
    assert not torch.allclose(base, model((images, text), loops=(1, 4)).logits)  # and text loops
    assert torch.allclose(model((images, text), loops=2).logits, model((images, text), loops=(2, 2)).logits)


def test_two_stream_model_runs_in_bfloat16():
    """`looped eval --dtype bfloat16` on a digit_names checkpoint: the vision stream's readout (float32) meets a
    bfloat16 bridge, and the text logits agree with the float32 model's to bfloat16's precision."""
    torch.manual_seed(0)
    model = mm.TwoStreamModel(load_config(["vision"], SETS).model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w_out.weight")):
                p.normal_(0, 0.05)
    (images, text), _ = mm.batch("test", 4, seed=0)
    with torch.no_grad():
        full = model((images, text), loops=(2, 2)).logits
        half = model.to(torch.bfloat16)((images.to(torch.bfloat16), text), loops=(2, 2)).logits
        grid = mm.evaluate_multimodal(model, [1, 2], [2])
    assert half.shape == full.shape and torch.isfinite(half).all()
    assert torch.allclose(half.float(), full, atol=0.1, rtol=0.05)
    assert set(grid["read"][2]) == {2}


def test_train_and_eval_the_grid(tmp_path, capsys):
    import json

    from looped.cli import main

    out = tmp_path / "names"
    sets = [*SETS, "train.steps=40", "train.global_batch=32", f"train.out={out}"]
    model, log = train_task(load_config(["vision"], sets), "digit_names", say=lambda m: None)
    assert log[-1]["loss"] < log[0]["loss"]
    grid = mm.evaluate_multimodal(model, [1, 2], [1, 3])
    assert set(grid) == {"write", "read"} and all(set(g) == {1, 2} for g in grid.values())
    assert all(set(row) == {1, 3} for g in grid.values() for row in g.values())
    plot = tmp_path / "grid.png"
    assert main(["eval", str(out / "final"), "--loops", "1,2", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "write: exact match" in text and "read: exact match" in text and text.count("T=2") == 4
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(out / "final"), "--loops", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["grid"]["write"]["1"]["1"] == mm.evaluate_multimodal(model, [1], [1])["write"][1][1]
