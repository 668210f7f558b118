"""Native checkpoint directories: round trip, atomic writes, strict loading with errors that name the key."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ids, randomize_, tiny
from safetensors.torch import load_file, save_file

import looped
from looped.checkpoint import CheckpointError


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_embeddings": False, "injection": "linear", "spectral_norm": ["core"]}]
)
def test_round_trip_gives_identical_logits(tmp_path, overrides):
    model = randomize_(looped.LoopedLM(tiny(**overrides))).eval()
    path = looped.save(model, tmp_path / "ck")
    assert sorted(p.name for p in path.iterdir()) == ["config.toml", "model.safetensors", "run.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind
    run = json.loads((path / "run.json").read_text())
    assert {"looped", "torch", "argv", "commit"} <= run.keys()
    loaded = looped.load(path)
    assert loaded.cfg == model.cfg and not loaded.training
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, loops=3).logits, model(x, loops=3).logits, rtol=0, atol=0)


def test_overwrite_replaces_checkpoint(tmp_path):
    a, b = randomize_(looped.LoopedLM(tiny()), 0), randomize_(looped.LoopedLM(tiny()), 1)
    looped.save(a, tmp_path / "ck")
    looped.save(b, tmp_path / "ck")
    torch.testing.assert_close(looped.load(tmp_path / "ck").embed.weight, b.embed.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_tied_head_is_stored_once(tmp_path):
    looped.save(looped.LoopedLM(tiny()), tmp_path / "ck")
    assert "head.weight" not in load_file(str(tmp_path / "ck" / "model.safetensors"))


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="config.toml"):
        looped.load(tmp_path)
    path = looped.save(looped.LoopedLM(tiny()), tmp_path / "ck")
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("core.0.attn.wq.weight")
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing weight 'core\.0\.attn\.wq\.weight'"):
        looped.load(path)
    weights["core.0.attn.wq.weight"] = torch.zeros(3, 3)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'core\.0\.attn\.wq\.weight' has shape \(3, 3\)"):
        looped.load(path)
    weights["core.0.attn.wq.weight"] = torch.zeros(32, 32)
    weights["bogus"] = torch.zeros(1)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected weight 'bogus'"):
        looped.load(path)
    (path / "config.toml").write_text("[model]\nwidht = 3\n")
    with pytest.raises(CheckpointError, match="did you mean 'width'"):
        looped.load(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    (path / "config.toml").write_text("[model]\n")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        looped.load(path)


def test_read_run_is_the_one_reader_of_run_json(tmp_path):
    from looped.checkpoint import read_run

    assert read_run(tmp_path) == {}  # no run.json: nothing recorded
    path = looped.save(looped.LoopedLM(tiny()), tmp_path / "ck", task="parity")
    run = read_run(path)
    assert run == json.loads((path / "run.json").read_text()) and run["task"] == "parity"
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        (path / "run.json").write_text(text)
        with pytest.raises(CheckpointError, match=match) as info:
            read_run(path)
        assert str(path / "run.json") in str(info.value)
        with pytest.raises(CheckpointError, match=match):  # load reads run.json's model_class through it
            looped.load(path)


def test_check_tokenizer_refuses_another_vocabulary_or_file(tmp_path):
    from looped.checkpoint import check_tokenizer, sha256
    from looped.data.tokenizer import Tokenizer

    tok = Tokenizer.bytes()
    path = tmp_path / "ck"
    path.mkdir()
    tok.save(path / "tokenizer.json")
    check_tokenizer(path, tok, tok.vocab_size)  # no run.json: only the size is checked
    with pytest.raises(
        CheckpointError, match=f"has {tok.vocab_size} tokens but the model's vocabulary has 300"
    ):
        check_tokenizer(path, tok, 300)
    (path / "run.json").write_text(json.dumps({"tokenizer_sha256": sha256(path / "tokenizer.json")}))
    check_tokenizer(path, tok, tok.vocab_size)  # the recorded file
    (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="not the tokenizer this model was trained with"):
        check_tokenizer(path, tok, tok.vocab_size)
