"""The looped ViT's data (bundled digits, moving-digit clips) and model: correct clips, several loop counts,
training and evaluation through the same commands as the other tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SMALL_STREAM_SETS

from looped.checkpoint import CheckpointError, load
from looped.config import ConfigError, load_config
from looped.tasks import vision
from looped.tasks.train import train_task

SETS = SMALL_STREAM_SETS


def test_digits_split_is_fixed_and_disjoint():
    images, labels = vision.digit_images()
    assert images.shape == (1797, 8, 8) and 0 <= images.min() and images.max() <= 1
    train, test = vision.split_indices("train"), vision.split_indices("test")
    assert len(test) == 360 and len(train) + len(test) == 1797 and not set(train) & set(test)
    task = vision.VISION_TASKS["digits"]
    a, b = task.batch("train", 16, seed=3), task.batch("train", 16, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = task.batch("test", None, seed=0)
    assert x.shape == (360, 1, 8, 8) and torch.equal(y, torch.from_numpy(labels[test]))
    assert torch.equal(x[:, 0], torch.from_numpy(images[test]))  # test images are not augmented


def test_clips_move_the_digit_one_pixel_per_frame():
    images, labels = vision.digit_images()
    rng = np.random.default_rng(0)
    clips, direction = vision.make_clips(images[:200], rng)
    assert set(direction) == {0, 1, 2, 3}
    for k in range(200):
        dr, dc = vision.DIRECTIONS[direction[k]]
        for f in range(vision.FRAMES - 1):
            moved = np.roll(clips[k, f], (dr, dc), axis=(0, 1))
            assert np.array_equal(moved, clips[k, f + 1])  # the path never touches the edge, so roll = move
        assert np.isclose(clips[k, 0].sum(), images[k].sum())  # the whole digit is on the canvas
    task = vision.VISION_TASKS["moving_digits"]
    x, y = task.batch("test", 40, seed=0)
    assert x.shape == (40, 4, 12, 12) and task.tokens == 36
    assert torch.equal(y // 4, torch.from_numpy(labels[vision.split_indices("test")[:40]]))


def test_patchify_orders_patches_by_frame_row_column():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = vision.patchify(x, (1, 2, 2))
    assert p.shape == (1, 8, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5] and p[0, 1].tolist() == [2, 3, 6, 7]
    assert p[0, 4].tolist() == [16, 17, 20, 21]  # the second frame's first patch


def test_looped_vit_runs_at_several_loop_counts():
    cfg = load_config(["vision"], SETS)
    for task in vision.VISION_TASKS.values():
        model = vision.LoopedViT(cfg.model, task).eval()
        x, y = task.batch("test", 8, seed=0)
        outs = [model(x, loops=t).logits for t in (1, 2, 8)]
        assert all(o.shape == (8, task.classes) for o in outs)
        assert not torch.allclose(outs[0], outs[2])  # more loops, another answer
        per_row = model(x, loops=torch.tensor([1, 2, 8, 1, 2, 8, 1, 2])).logits
        assert torch.allclose(per_row[2], outs[2][2], atol=1e-5)
        with pytest.raises(ValueError, match="inputs of shape"):
            model(torch.zeros(2, 1, 9, 9))


def test_a_tiny_looped_vit_learns_digits(tmp_path, capsys):
    import json

    from looped.cli import main

    out = tmp_path / "digits"
    sets = [*SETS, "train.steps=150", "train.global_batch=64", "optim.lr=5e-3", f"train.out={out}"]
    model, log = train_task(load_config(["vision"], sets), "digits", say=lambda m: None)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    table = vision.evaluate_vision(model, [1, 3])
    assert table["test"][3] > 0.4  # 10 classes: chance is 10 % (the preset reaches 95 %, docs/results.md)
    assert main(["eval", str(out / "final"), "--loops", "1,3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "digits" and result["table"]["test"]["3"] == table["test"][3]
    with pytest.raises(CheckpointError, match="LoopedViT"):
        load(out / "final")  # not a language model: generate, info and serve say so
    assert main(["eval", str(out / "final"), "--sizes", "8"]) == 2
    assert "no problem sizes" in capsys.readouterr().err
    assert main(["eval", str(out / "final"), "--problems", "8"]) == 2
    assert "fixed test split" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no problem size"):
        train_task(load_config(["vision"], sets), "digits", 8, say=lambda m: None)
