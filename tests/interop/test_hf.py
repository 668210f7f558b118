"""Hugging Face export: from_pretrained gives LoopedLM's logits, generate() (with and without the KV cache,
left-padded batches) gives a plain greedy loop's tokens, and a bad checkpoint is refused."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, require_optional, tiny
from infer.reference import reference_logits

import looped
from looped.checkpoint import CheckpointError, state_dict_for_save
from looped.data.tokenizer import Tokenizer

require_optional("transformers", "hf")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from looped.interop.hf import LoopedCache, LoopedForCausalLM, LoopedHFConfig, export_hf  # noqa: E402

SUBJECTS = ["the cat", "a dog", "my lord", "the king", "sweet kate", "the fool"]
OBJECTS = ["the moon.", "a rose.", "the queen.", "his horse.", "the sea.", "her ring."]


def corpus() -> list[str]:
    return [f"{s} {v} {o}" for s in SUBJECTS for v in ("sees", "loves", "fears") for o in OBJECTS]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(corpus(), vocab_size=300)


def make_checkpoint(root: Path, tok: Tokenizer, seed: int = 0, **overrides) -> tuple[looped.LoopedLM, Path]:
    cfg = tiny(vocab_size=tok.vocab_size, **overrides)
    model = randomize_(looped.LoopedLM(cfg), seed).eval()
    path = looped.save(model, root / f"ckpt{seed}")
    tok.save(path)
    return model, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A native model with every part active and a random initial state, and its export (num_loops = 2)."""
    root = tmp_path_factory.mktemp("hf")
    native, ckpt = make_checkpoint(root, tokenizer, state_init="like-init", n_kv_heads=2)
    out = export_hf(ckpt, root / "hf", num_loops=2)
    return native, out


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported[1]).eval()


def greedy(native: looped.LoopedLM, prompt: list[int], steps: int, loops: int) -> list[int]:
    """The reference: recompute the whole sequence with LoopedLM.forward for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(native(torch.tensor([ids]), loops=loops).logits[0, -1].argmax()))
    return ids


def prompts(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(t) for t in ("the king fears", "a dog", "sweet kate loves the")]


def cache_of(output):
    """The cache an output carries (`cache` since transformers 5.2x, `past_key_values` before)."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---------------------------------------------------------------------- export and loading
def test_export_writes_a_transformers_folder(exported, tokenizer):
    native, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_looped.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "looped" and config["architectures"] == ["LoopedForCausalLM"]
    assert config["num_loops"] == 2 and config["loops"] == native.cfg.loops
    assert config["width"] == native.cfg.width and config["state_init"] == "like-init"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eot_id

    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    expected = state_dict_for_save(native)
    assert "head.weight" not in expected  # tied: the head is the embedding, stored once
    assert sorted(weights) == sorted(f"model.{k}" for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(weights[f"model.{key}"], tensor), key


def test_from_pretrained_matches_native_logits_at_every_loop_count(exported, hf_model):
    native, _ = exported
    assert isinstance(hf_model, LoopedForCausalLM) and hf_model.config.num_loops == 2
    ids = torch.randint(0, native.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (1, 2, 3, 6):
            torch.testing.assert_close(
                hf_model(ids, num_loops=T).logits, native(ids, loops=T).logits, rtol=0, atol=0
            )
        # the default is the export's num_loops, not the checkpoint's model.loops
        torch.testing.assert_close(hf_model(ids).logits, native(ids, loops=2).logits, rtol=0, atol=0)
        per_row = torch.tensor([1, 4])
        torch.testing.assert_close(
            hf_model(ids, num_loops=per_row).logits, native(ids, loops=per_row).logits, rtol=0, atol=0
        )
        # right padding cannot change the logits of earlier tokens; logits_to_keep keeps the last ones
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        out = hf_model(ids, attention_mask=mask, logits_to_keep=3, num_loops=3)
        torch.testing.assert_close(out.logits, native(ids, loops=3).logits[:, -3:], rtol=0, atol=0)
        assert out.loss is None and cache_of(out) is None


def test_labels_give_the_shifted_causal_loss(exported, hf_model):
    native, _ = exported
    ids = torch.randint(0, native.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        loss = hf_model(ids, labels=labels, num_loops=3).loss
        logits = native(ids, loops=3).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_tokenizer_encodes_like_the_native_one(exported, tokenizer):
    hf_tok = AutoTokenizer.from_pretrained(exported[1])
    # text that spells the end-of-text token stays text, as in the native tokenizer
    text = "sweet kate fears the moon.<|endoftext|> Ünïcode 🙂"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == text
    assert hf_tok.eos_token_id == tokenizer.eot_id == hf_tok.pad_token_id
    assert hf_tok.model_max_length == 32


def test_untied_head_and_standard_transformer(tmp_path, tokenizer):
    variants = (
        dict(tie_embeddings=False),
        dict(core_layers=0, value_embeds=False),
        dict(injection="linear", spectral_norm=["injection", "readout", "core"]),
    )
    for seed, overrides in enumerate(variants, start=1):
        native, ckpt = make_checkpoint(tmp_path, tokenizer, seed=seed, **overrides)
        model = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / f"hf{seed}"))
        ids = torch.randint(0, native.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, native(ids).logits, rtol=0, atol=0)
        if not native.cfg.tie_embeddings:
            assert model.model.head.weight.data_ptr() != model.model.embed.weight.data_ptr()


def test_a_new_model_keeps_the_native_init():
    """transformers' post_init must not replace LoopedLM's own init (zero output projections, orthogonal C)."""
    cfg = tiny()
    torch.manual_seed(0)
    native = looped.LoopedLM(cfg)
    torch.manual_seed(0)
    wrapped = LoopedForCausalLM(LoopedHFConfig.from_model_config(cfg))
    assert wrapped.config.num_loops == cfg.loops and wrapped.config.model_config() == cfg
    theirs = wrapped.model.state_dict()
    for key, tensor in native.state_dict().items():
        assert torch.equal(theirs[key], tensor), key
    assert wrapped.model.head.weight is wrapped.model.embed.weight


def test_export_refuses_a_checkpoint_without_tokenizer(tmp_path, tokenizer):
    _, ckpt = make_checkpoint(tmp_path, tokenizer)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="config.toml"):
        export_hf(tmp_path / "missing", tmp_path / "out")


def test_from_pretrained_is_strict_about_weights(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    out = shutil.copytree(exported[1], tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    del weights["model.readout.weight"]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.readout.weight"):
        AutoModelForCausalLM.from_pretrained(out)


def test_auto_map_names_the_shim_classes(exported):
    """The route of tools that cannot import looped first (lm_eval's command line, trust_remote_code=True):
    config.json's auto_map names modules in the folder, and those hold this module's classes."""
    out = exported[1]
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    expected = {"AutoConfig": LoopedHFConfig, "AutoModelForCausalLM": LoopedForCausalLM}
    assert set(auto_map) == set(expected)
    for auto, reference in auto_map.items():
        module, name = reference.split(".")
        namespace = runpy.run_path(str(out / f"{module}.py"))
        assert namespace[name] is expected[auto]


# ---------------------------------------------------------------------- generate()
def test_greedy_generate_without_cache_matches_a_plain_loop(exported, hf_model, tokenizer):
    native, _ = exported
    prompt = prompts(tokenizer)[0]
    for T in (1, 3):
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, num_loops=T, use_cache=False
        )
        assert out[0].tolist() == greedy(native, prompt, 8, T)


def test_cached_generate_matches_uncached_and_loops_matter(exported, hf_model, tokenizer):
    native, _ = exported
    prompt = torch.tensor([prompts(tokenizer)[2]])
    outputs = {}
    for T in (1, 2, 5):
        cached = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, num_loops=T)
        uncached = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, num_loops=T, use_cache=False)
        assert cached.tolist() == uncached.tolist(), f"T={T}"
        outputs[T] = cached[0].tolist()
    assert len({tuple(v) for v in outputs.values()}) > 1, "num_loops did not change the output"
    # without num_loops, the export's default (2) is used
    default = hf_model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert default[0].tolist() == outputs[2]


def test_generate_returns_the_looped_cache(exported, hf_model, tokenizer):
    prompt = torch.tensor([prompts(tokenizer)[0]])
    out = hf_model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    assert isinstance(cache, LoopedCache) and cache.kv.mode == "per-loop"
    # every token but the last generated one has its keys and values cached
    assert cache.get_seq_length() == out.sequences.shape[1] - 1


def test_left_padded_batch_matches_each_prompt_alone(exported, hf_model, tokenizer):
    native, _ = exported
    rows = prompts(tokenizer)
    ids, mask = left_pad(rows, pad=tokenizer.eot_id)
    assert bool((mask == 0).any())
    for use_cache in (True, False):
        out = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=7, do_sample=False, num_loops=3, use_cache=use_cache
        )
        for b, row in enumerate(rows):
            assert out[b, ids.shape[1] :].tolist() == greedy(native, row, 7, 3)[len(row) :], (use_cache, b)


def test_left_padded_logits_match_the_unpadded_prompt(exported, hf_model, tokenizer):
    native, _ = exported
    rows = prompts(tokenizer)
    ids, mask = left_pad(rows, pad=tokenizer.eot_id)
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=mask, num_loops=4).logits
        for b, row in enumerate(rows):
            alone = native(torch.tensor([row]), loops=4).logits[0]
            torch.testing.assert_close(logits[b, ids.shape[1] - len(row) :], alone, rtol=1e-5, atol=1e-5)


def test_beam_search_with_cache_matches_without(exported, hf_model, tokenizer):
    prompt = torch.tensor([prompts(tokenizer)[1]])
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=3, num_loops=2)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    cached = hf_model.generate(prompt, **kwargs)
    uncached = hf_model.generate(prompt, use_cache=False, **kwargs)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


def test_reordered_cache_continues_the_reordered_sequences(exported, hf_model):
    """What beam search relies on: after reorder_cache(idx), row r continues the sequence idx[r]."""
    vocab = exported[0].cfg.vocab_size
    ids = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(3))
    step = torch.randint(0, vocab, (3, 1), generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = cache_of(hf_model(ids, use_cache=True, num_loops=3))
        cache.reorder_cache(idx)
        got = hf_model(step, cache=cache, num_loops=3).logits[:, -1]
        expected = hf_model(torch.cat([ids[idx], step], 1), num_loops=3).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_cache_equals_per_loop_at_one_loop(exported, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(exported[1], kv_cache="shared").eval()
    assert model.config.kv_cache == "shared"
    prompt = torch.tensor([prompts(tokenizer)[0]])
    one = model.generate(prompt, max_new_tokens=6, do_sample=False, num_loops=1)
    assert (
        one.tolist()
        == model.generate(prompt, max_new_tokens=6, do_sample=False, num_loops=1, use_cache=False).tolist()
    )
    # At 4 loops the shared rule (an earlier token is read at its last loop) differs from the plain model:
    # check the tokens against the position-by-position reference of that rule.
    many = model.generate(prompt, max_new_tokens=6, do_sample=False, num_loops=4)[0].tolist()
    n = prompt.shape[1]
    ref = reference_logits(exported[0], many, n, 4, "shared")  # logits at positions n-1 .. end
    assert many[n:] == ref[:-1].argmax(-1).tolist()


def test_cli_export_hf(tmp_path, tokenizer, capsys):
    from looped.cli import main

    native, ckpt = make_checkpoint(tmp_path, tokenizer)
    assert main(["export", "hf", str(ckpt), str(tmp_path / "out"), "--loops", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_loops == 3
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, native(x, loops=3).logits, rtol=0, atol=1e-5)
    assert main(["export", "hf", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "not a looped checkpoint" in capsys.readouterr().err


def test_export_in_bfloat16(tmp_path, tokenizer):
    native, ckpt = make_checkpoint(tmp_path, tokenizer)
    out = export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert model.model.embed.weight.dtype == torch.bfloat16
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got, want = model(x, num_loops=2).logits, native(x, loops=2).logits
    assert got.dtype == torch.float32  # the head's logits are float32 in every precision
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not another model
    with pytest.raises(ValueError, match="unknown dtype"):
        export_hf(ckpt, tmp_path / "bad", dtype="float8")
