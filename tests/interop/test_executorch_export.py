"""`looped export executorch`: both programs equal PyTorch at T = 1 and 4 through ExecuTorch's runtime, and
looped.edge's host loop over them decodes the Engine's greedy tokens in both cache modes and with exit."""

from __future__ import annotations

import json

import pytest

from looped import Engine, load
from looped.cli import main
from looped.data.tokenizer import Tokenizer

PROMPT = "the cat sat on"


def test_manifest_and_parity(executorch_exported):
    m = json.loads((executorch_exported / "manifest.json").read_text())
    assert m["format"] == "looped-executorch"
    assert set(m["programs"]) == {"portable", "xnnpack"} and m["programs"]["xnnpack"]["batch"] == 1
    for variant, p in m["programs"].items():
        assert (executorch_exported / p["file"]).stat().st_size == p["bytes"]
        assert set(m["parity"][variant]) == {"1", "4"}
        assert max(m["parity"][variant].values()) < 1e-4
    assert m["methods"]["core_step_cached"]["inputs"][0] == "state"


@pytest.mark.parametrize("variant", ["portable", "xnnpack"])
@pytest.mark.parametrize(
    ("mode", "loops", "exit"), [("per-loop", 1, None), ("shared", 4, None), ("per-loop", 8, "state:0.02")]
)
def test_decoding_through_executorch_matches_the_engine(
    executorch_exported, trained, variant, mode, loops, exit
):
    from looped.interop.executorch_export import ExecuTorchGraphs

    engine = Engine(load(trained), Tokenizer.load(trained), kv_cache=mode)
    ref = engine.generate(PROMPT, loops=loops, exit=exit, max_new_tokens=10, temperature=0)
    pieces = ExecuTorchGraphs(executorch_exported, variant).generate(
        PROMPT, loops=loops, exit=exit, kv_cache=mode, max_new_tokens=10, temperature=0
    )
    assert [p.token for p in pieces] == ref.token_ids
    assert [p.loops for p in pieces][1:] == ref.loops[1:]


def test_cli_refuses_an_unknown_variant(trained, tmp_path, capsys):
    pytest.importorskip("executorch")
    assert main(["export", "executorch", str(trained), str(tmp_path / "x"), "--variants", "coreml"]) == 2
    assert "variants" in capsys.readouterr().err
