"""`looped export onnx`: the graphs in ONNX Runtime equal PyTorch at T = 1, 4, 8, 32 (part graphs and the one
Loop graph, uncached; the cached graphs in both KV-cache modes), the manifest says what was written, and the
int8 variant is smaller and measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ids

from looped import load
from looped.cli import main
from looped.errors import EdgeError
from looped.infer.cache import KVCache
from looped.infer.forward import forward_cached

pytest.importorskip("numpy")


def _edge(exported, variant="float32"):
    from looped.edge import EdgeModel

    return EdgeModel(exported, variant=variant, threads=1)


@pytest.mark.parametrize("loops", [1, 4, 8, 32])
def test_uncached_graphs_equal_pytorch(exported, trained, loops):
    model, edge = load(trained), _edge(exported)
    x = ids(3, 40, vocab=model.cfg.vocab_size, seed=loops)
    with torch.no_grad():
        ref = model(x, loops=loops).logits.numpy()
    np.testing.assert_allclose(edge.logits(x.numpy(), loops), ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(edge.logits(x.numpy(), loops, graph="loop"), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["shared", "per-loop"])
def test_cached_graphs_equal_forward_cached(exported, trained, mode):
    from looped.edge.decode import Generation

    model, edge = load(trained), _edge(exported)
    gen, cache = Generation(edge, kv_cache=mode), KVCache(model.cfg, mode)
    tokens = ids(1, 20, vocab=model.cfg.vocab_size)[0].tolist()
    for a, b, loops in [(0, 9, 4), (9, 10, 1), (10, 11, 8), (11, 12, 32), (12, 15, 2), (15, 16, 4)]:
        with torch.no_grad():
            ref = forward_cached(model, cache, torch.tensor([tokens[a:b]]), loops=loops).logits[0].numpy()
        np.testing.assert_allclose(gen.step(tokens[a:b], loops)[0], ref, rtol=0, atol=1e-4)


def test_manifest_describes_the_export(exported, trained):
    m = json.loads((exported / "manifest.json").read_text())
    cfg = load(trained).cfg
    assert (
        m["format"] == "looped-onnx"
        and m["vocab_size"] == cfg.vocab_size
        and m["loops"]["default"] == cfg.loops
    )
    for name in ("prelude", "core_step", "coda", "prelude_cached", "core_step_cached", "coda_cached", "loop"):
        assert (exported / m["graphs"][name]["file"]).is_file()
        assert m["graphs"][name]["bytes"] == (exported / m["graphs"][name]["file"]).stat().st_size
    names = [i["name"] for i in m["graphs"]["core_step_cached"]["inputs"]]
    assert names[0] == "state" and "start" in names and "past_key_core_0" in names
    loop_inputs = {i["name"]: i for i in m["graphs"]["loop"]["inputs"]}
    assert loop_inputs["loops"]["shape"] == [] and loop_inputs["loops"]["dtype"] == "int64"
    assert all(d < 1e-4 for p in m["parity"].values() for d in p.values())
    assert (exported / "tokenizer.json").is_file()


def test_int8_is_smaller_and_its_loss_is_measured(exported):
    m = json.loads((exported / "manifest.json").read_text())
    for part in ("prelude", "core_step", "coda"):
        assert m["graphs"][f"{part}.int8"]["bytes"] < 0.6 * m["graphs"][part]["bytes"]
    loss = m["loss"]
    assert loss["tokens"] > 0
    for t in ("1", "4", "8"):
        assert abs(loss["float32"][t] - loss["torch"][t]) < 1e-4
        assert abs(loss["int8"][t] - loss["torch"][t]) < 0.1
        assert loss["int8"][t] != loss["float32"][t]  # the int8 graphs really are other numbers
    edge = _edge(exported, "int8")
    assert [p.token for p in edge.generate([5, 6, 7], loops=4, max_new_tokens=4, temperature=0)]


def test_export_refuses_what_it_cannot_write(tmp_path, capsys, trained):
    assert main(["export", "onnx", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "not a looped checkpoint" in capsys.readouterr().err
    assert main(["export", "onnx", str(trained), str(tmp_path / "out"), "--max-seq-len", "4"]) == 2
    assert "--max-seq-len" in capsys.readouterr().err


def test_converted_ouro_matches_the_original_on_onnx_runtime(tmp_path):
    """Ouro (no prelude or coda, the norm every loop, an exit gate), converted from the fixture its own code
    made and exported without a tokenizer: its logits at every stored loop count and its greedy tokens are
    the original's, and the gate exits as the Engine's does."""
    from helpers import fixture_dir
    from safetensors.torch import load_file

    from looped.edge import EdgeModel
    from looped.interop.convert import convert
    from looped.interop.onnx_export import export_onnx

    src = fixture_dir("ouro-tiny")
    _, native = convert(src, tmp_path / "native")
    export_onnx(native, tmp_path / "edge", progress=False)
    ref = load_file(str(src / "reference.safetensors"))
    edge = EdgeModel(tmp_path / "edge", threads=1)
    stored = sorted(int(k.removeprefix("logits_T")) for k in ref if k.startswith("logits_T"))
    for t in stored:
        np.testing.assert_allclose(
            edge.logits(ref["input_ids"].numpy(), t), ref[f"logits_T{t}"].numpy(), rtol=0, atol=1e-4
        )
    for row in range(ref["greedy_T4"].shape[0]):
        prompt = ref["input_ids"][row, :8].tolist()
        got = [
            p.token
            for p in edge.generate(prompt, loops=4, max_new_tokens=16, temperature=0, kv_cache="per-loop")
        ]
        assert got == ref["greedy_T4"][row].tolist()
    from looped import Engine

    engine = Engine(load(native), kv_cache="shared")
    prompt = ref["input_ids"][0, :8].tolist()
    want = engine.generate(prompt, loops=8, exit="gate:0.5", max_new_tokens=12, temperature=0)
    pieces = list(edge.generate(prompt, loops=8, exit="gate:0.5", max_new_tokens=12, temperature=0))
    assert [p.token for p in pieces] == want.token_ids and [p.loops for p in pieces][1:] == want.loops[1:]
    assert min(want.loops[1:]) < 8, "the gate never fired: the test would not see a wrong exit"
    with pytest.raises(EdgeError, match="no tokenizer"):
        list(edge.generate("text", loops=2))
