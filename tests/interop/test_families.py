"""Released looped families converted into LoopedLM: Huginn-0125, a retrofitted Llama and Ouro, each against
a fixture made by the family's own code (logits at every stored loop count, greedy tokens of its cached
generate, Ouro's exit probabilities), plus what the runtime adds: both cache modes, exit by Ouro's gate with
the skipped compute counted, sharded bf16 sources, batches of mixed lengths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import fixture_dir, require_optional
from infer.reference import reference_logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import looped
from looped.cli import main
from looped.errors import ConversionError
from looped.infer.engine import Engine
from looped.interop.convert import convert

FIXTURES = {"huginn": "huginn-tiny", "retrofit": "retrofit-llama-tiny", "ouro": "ouro-tiny"}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    src = fixture_dir(FIXTURES[family])
    found, out = convert(src, tmp_path_factory.mktemp(family) / "native")
    assert found == family  # detected from config.json and the weights
    return out, load_file(str(src / "reference.safetensors"))


@pytest.fixture(scope="module")
def converted(checkpoint):
    out, ref = checkpoint
    return looped.load(out), ref


def test_logits_match_the_original_at_every_stored_loop_count(converted):
    model, ref = converted
    stored = sorted(int(k.removeprefix("logits_T")) for k in ref if k.startswith("logits_T"))
    assert len(stored) >= 5
    with torch.no_grad():
        for t in stored:
            got = model(ref["input_ids"], loops=t).logits
            torch.testing.assert_close(got, ref[f"logits_T{t}"], rtol=0, atol=1e-4, msg=f"T = {t}")


def test_greedy_tokens_match_the_original_cached_generate(converted):
    model, ref = converted
    prompts = ref["input_ids"][:, :8].tolist()
    gens = Engine(model, kv_cache="per-loop").generate(prompts, loops=4, max_new_tokens=16, temperature=0)
    assert [g.token_ids for g in gens] == ref["greedy_T4"].tolist()


def test_shared_cache_follows_its_rule_on_every_family(converted):
    """The shared cache reads an earlier token at its last loop: another computation than the original's
    per-loop cache, so its tokens are checked against the position-by-position reference of that rule."""
    model, ref = converted
    prompt = ref["input_ids"][0, :8].tolist()
    out = Engine(model, kv_cache="shared").generate(prompt, loops=4, max_new_tokens=6, temperature=0)
    ids = prompt + out.token_ids
    logits = reference_logits(model, ids, len(prompt), 4, "shared")
    assert out.token_ids == logits[:-1].argmax(-1).tolist()


def test_a_batch_of_mixed_lengths_gives_each_row_its_own_tokens(converted):
    model, ref = converted
    rows = [ref["input_ids"][0, :8].tolist(), ref["input_ids"][1, :3].tolist()]
    engine = Engine(model, kv_cache="per-loop")
    together = engine.generate(rows, loops=3, max_new_tokens=6, temperature=0)
    alone = [engine.generate(r, loops=3, max_new_tokens=6, temperature=0) for r in rows]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_state_stays_bounded_far_past_the_trained_depth(converted):
    model, ref = converted
    with torch.no_grad():
        report = model.stability_report(ref["input_ids"], loops=32)
    assert all(torch.isfinite(torch.tensor(report.state_norms)))
    assert max(report.state_norms) < 100 * report.state_norms[0]


def test_ouro_exit_probabilities(tmp_path):
    src = fixture_dir("ouro-tiny")
    _, out = convert(src, tmp_path / "ouro")
    model, ref = looped.load(out), load_file(str(src / "reference.safetensors"))
    probs = model.exit_probs(ref["input_ids"], loops=4)
    torch.testing.assert_close(probs, ref["exit_probs"], rtol=0, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]), rtol=0, atol=1e-6)


def test_ouro_gate_exit_skips_the_remaining_loops(tmp_path):
    """`--exit gate:0.5` stops a token at the first loop whose cumulative exit probability reaches 0.5, and
    the loops after it are not run: the core's first block is called fewer times than at fixed 4 loops."""
    src = fixture_dir("ouro-tiny")
    _, out = convert(src, tmp_path / "ouro")
    model = looped.load(out)
    prompts = load_file(str(src / "reference.safetensors"))["input_ids"][:, :8].tolist()
    calls = []
    model.core[0].register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))

    def rows_run(**kwargs):
        calls.clear()
        gens = Engine(model, kv_cache="per-loop").generate(prompts, loops=4, max_new_tokens=12, **kwargs)
        return gens, sum(calls)

    fixed, fixed_rows = rows_run(temperature=0)
    gated, gated_rows = rows_run(temperature=0, exit="gate:0.5")
    mean = sum(g.mean_loops for g in gated) / len(gated)
    assert mean < 3.5 and all(g.mean_loops <= 4 for g in gated)
    assert gated_rows < fixed_rows  # row-loops of core compute actually run
    # The first decoded token sees only the prompt, which ran every loop, so its context is the plain
    # forward's: it stops where the full forward's cumulative exit probability first reaches 0.5.
    for prompt, gen in zip(prompts, gated, strict=True):
        ids = torch.tensor([prompt + gen.token_ids])
        cum = model.exit_probs(ids, loops=4)[0, len(prompt)].cumsum(-1)  # position of the first new token
        reached = (cum[:3] >= 0.5).nonzero()
        assert gen.loops[1] == (int(reached[0]) + 1 if len(reached) else 4)
    with pytest.raises(ValueError, match="exit gate"):
        Engine(looped.LoopedLM(looped.ModelConfig())).generate([1, 2], exit="gate:0.5", max_new_tokens=1)


def _shard(src, dst, n_shards: int, dtype: torch.dtype) -> None:
    """The fixture re-saved as a release would be: n safetensors shards with an index, in `dtype`."""
    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].to(dtype).contiguous() for k in part}, str(dst / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
    (dst / "config.json").write_text(json.dumps(config))


def test_sharded_bf16_tied_checkpoint_converts_like_the_single_file(tmp_path):
    src = fixture_dir("huginn-tiny")  # tied head, saved without lm_head.weight
    sharded = tmp_path / "sharded"
    _shard(src, sharded, 3, torch.bfloat16)
    _, a = convert(sharded, tmp_path / "from-shards")
    _, b = convert(src, tmp_path / "from-single", dtype="bfloat16")
    with safe_open(str(a / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # kept in bf16
        assert "head.weight" not in f.keys()  # tied: the head is the embedding
    x = load_file(str(src / "reference.safetensors"))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            looped.load(a)(x, loops=4).logits, looped.load(b)(x, loops=4).logits, rtol=0, atol=0
        )
    _, c = convert(sharded, tmp_path / "fp32", dtype="float32")
    with safe_open(str(c / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_cli_convert_detects_or_is_told_the_family(tmp_path, capsys):
    src = fixture_dir("ouro-tiny")
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert "(ouro)" in capsys.readouterr().out
    assert main(["convert", "ouro", str(src), str(tmp_path / "b")]) == 0
    assert main(["convert", "huginn", str(src), str(tmp_path / "c")]) == 2
    assert "model_type 'ouro', not 'huginn_raven'" in capsys.readouterr().err
    retro = fixture_dir("retrofit-llama-tiny")
    assert main(["convert", "huginn", str(retro), str(tmp_path / "d")]) == 2
    assert "a retrofitted Llama, not Huginn" in capsys.readouterr().err
    assert main(["convert", "nope", str(src), str(tmp_path / "e")]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err


def test_carried_tokenizer_files_and_unknown_weights(tmp_path):
    src = tmp_path / "ouro"
    shutil.copytree(fixture_dir("ouro-tiny"), src)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    _, out = convert(src, tmp_path / "native")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    run = json.loads((out / "run.json").read_text())
    assert run["source_format"] == "ouro"
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(
        ConversionError, match="model.extra.weight: a ouro weight this converter does not know"
    ):
        convert(src, tmp_path / "bad")
    config = json.loads((src / "config.json").read_text())
    config["use_sliding_window"] = True
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="use_sliding_window"):
        convert(src, tmp_path / "bad2")


def test_export_hf_round_trips_every_family(checkpoint, tmp_path):
    """The converted model exported for transformers (looped's own classes, no remote code) gives the same
    logits, and its left-padded batch generates what each row generates alone."""
    require_optional("transformers", "eval")
    from transformers import AutoModelForCausalLM

    from looped.data.tokenizer import Tokenizer
    from looped.interop.hf import export_hf

    out, ref = checkpoint
    native = tmp_path / "native"
    shutil.copytree(out, native)
    Tokenizer.bytes().save(native)  # the fixtures ship no tokenizer; export needs one
    hf = AutoModelForCausalLM.from_pretrained(export_hf(native, tmp_path / "hf", num_loops=4)).eval()
    x = ref["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref["logits_T4"], rtol=0, atol=1e-4)
    long, short = x[0, :8].tolist(), x[1, :5].tolist()
    ids = torch.tensor([long, [0] * 3 + short])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in zip(batch[:, 8:].tolist(), (long, short), strict=True):
        alone = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert row == alone[0, len(prompt) :].tolist()
