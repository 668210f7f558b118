"""The training loop: learning, exact resume, guards and roll-back, checkpoints, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import losses, train_config, write_corpus

from looped import load
from looped.checkpoint import load_config_dir
from looped.config import ConfigError
from looped.data import DataError
from looped.data.loader import TokenData, val_windows
from looped.data.prepare import prepare
from looped.train import state as ckpt
from looped.train import step as train_step
from looped.train.trainer import TrainingError, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prepare(write_corpus(root / "text"), root / "tokens", tokenizer="bytes", val_fraction=0.2, progress=False)
    return root / "tokens"


def recomputed_val_loss(checkpoint, data, loops: int) -> float:
    """Mean next-token loss of a saved model on the run's validation windows, by plain cross-entropy."""
    cfg = load_config_dir(checkpoint)
    windows = val_windows(TokenData.open(data), cfg.data.seq_len, cfg.eval.max_windows)  # (N, S + 1)
    with torch.no_grad():
        logits = load(checkpoint)(windows[:, :-1], loops=loops).logits
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


def test_loss_falls_and_run_dir_is_complete(data, tmp_path):
    cfg = train_config(
        data, tmp_path / "run", train={"steps": 30, "checkpoint_every": 10}, eval={"every": 20}
    )
    result = train(cfg)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    first = sum(curve[s] for s in range(1, 4)) / 3
    last = sum(curve[s] for s in range(28, 31)) / 3
    assert last < first - 1.0, (first, last)
    assert set(result.eval) == {1, 2} and all(math.isfinite(v) for v in result.eval.values())
    assert result.eval[2] < math.log(256)  # better than uniform over bytes
    # The final directory loads on its own, with its tokenizer, and gives the logged validation loss back.
    model = load(result.final)
    assert (result.final / "tokenizer.json").is_file()
    assert model.cfg.vocab_size == 256
    kept = [p.name for p in ckpt.checkpoints(tmp_path / "run")]
    assert kept == ["step_0000030", "step_0000020", "step_0000010"]
    assert "done: 30 steps" in result.summary()
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = {r["step"]: r["val_loss"] for r in map(json.loads, records) if "val_loss" in r}
    assert sorted(logged) == [20, 30] and logged[30] == {str(t): v for t, v in result.eval.items()}
    for step, where in ((20, tmp_path / "run" / "checkpoints" / "step_0000020"), (30, result.final)):
        for t in (1, 2):
            assert logged[step][str(t)] == pytest.approx(recomputed_val_loss(where, data, t), abs=1e-5)


def test_kill_and_resume_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    cfg = train_config(data, tmp_path / "full", train={"steps": 10, "checkpoint_every": 4})
    train(cfg)
    full = losses(tmp_path / "full")

    # The second run dies in the middle of step 7 (after the checkpoint at step 4 — and at 0).
    cfg2 = train_config(data, tmp_path / "killed", train={"steps": 10, "checkpoint_every": 4})
    real = train_step._forward_loss
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step, "_forward_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train(cfg2)
    monkeypatch.setattr(train_step, "_forward_loss", real)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg2)
    result = train(cfg2, resume=True)
    resumed = losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 11))  # records after the checkpoint were rewritten, not doubled
    for step in range(1, 11):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    a, b = load(tmp_path / "full" / "final"), load(result.final)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_corrupt_checkpoint_falls_back_to_previous(data, tmp_path, capsys):
    cfg = train_config(data, tmp_path / "run", train={"steps": 8, "checkpoint_every": 4})
    train(cfg)
    newest = ckpt.checkpoints(tmp_path / "run")[0]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert "sha256" in ckpt.verify(newest)
    cfg_more = train_config(data, tmp_path / "run", train={"steps": 10, "checkpoint_every": 4})
    result = train(cfg_more, resume=True)
    assert "unusable" in capsys.readouterr().out
    assert result.steps == 10
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))


def test_non_finite_steps_are_skipped_then_rolled_back(data, tmp_path, monkeypatch, capsys):
    real = train_step._forward_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if 6 <= calls["n"] <= 8:  # steps 6, 7, 8 (1-based calls) give NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_step, "_forward_loss", poisoned)
    cfg = train_config(data, tmp_path / "run", train={"steps": 10, "checkpoint_every": 4, "max_bad_steps": 3})
    result = train(cfg)
    out = capsys.readouterr().out
    assert out.count("non-finite loss; step skipped") == 3
    assert "rolled back to step 4 with the learning rate × 0.5" in out
    assert result.skipped == 3 and result.rollbacks == 1 and result.steps == 10
    rec = json.loads(ckpt.checkpoints(tmp_path / "run")[0].joinpath("trainer.json").read_text())
    assert rec["lr_scale"] == 0.5
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())


def test_gives_up_after_max_rollbacks(data, tmp_path, monkeypatch):
    real = train_step._forward_loss

    def always_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_step, "_forward_loss", always_nan)
    cfg = train_config(data, tmp_path / "run", train={"max_bad_steps": 2, "max_rollbacks": 1})
    with pytest.raises(TrainingError, match="diverges"):
        train(cfg)


def test_activation_checkpointing_gives_the_same_run(data, tmp_path):
    train(train_config(data, tmp_path / "a", train={"steps": 4}))
    train(train_config(data, tmp_path / "b", train={"steps": 4, "activation_checkpointing": True}))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


def test_muon_and_cosine_train(data, tmp_path):
    cfg = train_config(
        data, tmp_path / "run", optim={"optimizer": "muon", "schedule": "cosine"}, train={"steps": 12}
    )
    train(cfg)
    curve = losses(tmp_path / "run")
    assert curve[12] < curve[1]


def test_vocab_follows_the_tokenizer(data, tmp_path, capsys):
    cfg = train_config(data, tmp_path / "run", model={"vocab_size": 512}, train={"steps": 1})
    result = train(cfg)
    assert "model.vocab_size 512 → 256" in capsys.readouterr().out
    assert load(result.final).cfg.vocab_size == 256


def test_bad_inputs_give_clear_errors(data, tmp_path):
    with pytest.raises(DataError, match="looped data prepare"):
        train(train_config(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ConfigError, match="global_batch"):
        train(train_config(data, tmp_path / "run2", train={"global_batch": 5, "micro_batch": 2}))
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(train_config(data, tmp_path / "run3", data={"seq_len": 64}))


def test_resume_without_checkpoints_starts_fresh(data, tmp_path):
    result = train(train_config(data, tmp_path / "run", train={"steps": 2}), resume=True)
    assert result.steps == 2
    shutil.rmtree(tmp_path / "run")


def test_the_step_zero_checkpoint_leaves_the_optimizer_fresh(tmp_path):
    """Saving an optimizer that has not stepped must not step it: torch's state_dict helper initialises an
    empty AdamW by a zero-gradient step, after which the first real update is ~0.75× its size."""
    from looped.config import Config
    from looped.distributed import Dist
    from looped.model.lm import LoopedLM
    from looped.train.optim import build_optimizers

    cfg = Config()
    cfg.model.vocab_size, cfg.model.width, cfg.model.n_heads = 32, 16, 2
    model = LoopedLM(cfg.model)
    opts = build_optimizers(model, cfg.optim)
    ckpt.save_training(tmp_path, ckpt.TrainState(), model, opts, cfg, Dist(), keep=2)
    assert all(not o.state for o in opts.optimizers)
    # Resuming from that checkpoint starts fresh too.
    model2 = LoopedLM(cfg.model)
    opts2 = build_optimizers(model2, cfg.optim)
    ckpt.load_training(ckpt.checkpoints(tmp_path)[0], model2, opts2)
    assert all(not o.state for o in opts2.optimizers)
    # One real step then counts as one.
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[2, 3, 4]])).loss.backward()
    for o in opts.optimizers:
        o.step()
    steps = {float(s["step"]) for o in opts.optimizers for s in o.state.values() if "step" in s}
    assert steps == {1.0}
