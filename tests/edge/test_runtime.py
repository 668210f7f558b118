"""looped.edge on a real export: greedy tokens equal the Engine's, it runs with torch unimportable, and
`looped generate --backend onnx` prints what the torch backend prints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from looped import Engine, load
from looped.cli import main
from looped.data.tokenizer import Tokenizer

PROMPT = "the cat sat on"


@pytest.mark.parametrize("mode", ["shared", "per-loop"])
@pytest.mark.parametrize(
    ("loops", "exit"), [(1, None), (4, None), (8, None), (12, "state:0.02"), (12, "kl:0.01")]
)
def test_greedy_tokens_equal_the_engine(exported, trained, mode, loops, exit):
    from looped.edge import EdgeModel

    engine = Engine(load(trained), Tokenizer.load(trained), kv_cache=mode)
    ref = engine.generate(PROMPT, loops=loops, exit=exit, max_new_tokens=16, temperature=0)
    edge = EdgeModel(exported, threads=1)
    pieces = list(
        edge.generate(PROMPT, loops=loops, exit=exit, kv_cache=mode, max_new_tokens=16, temperature=0)
    )
    assert [p.token for p in pieces] == ref.token_ids
    assert "".join(p.text for p in pieces) == ref.text
    assert [p.loops for p in pieces][1:] == ref.loops[1:]
    if exit is not None:
        assert min(ref.loops[1:]) < loops, "no token exited early: the test would not see a wrong exit"


BLOCKED = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    from looped.edge import EdgeModel

    model = EdgeModel(sys.argv[1], threads=1)
    pieces = list(model.generate(sys.argv[2], loops=4, max_new_tokens=12, temperature=0, exit="state:0.02"))
    loss = model.loss(__import__("numpy").array([[1, 2, 3, 4, 5, 6]]), 2)
    print(json.dumps({"tokens": [p.token for p in pieces], "torch": "torch" in sys.modules, "loss": loss}))
    """
)


def test_edge_runs_with_torch_blocked(exported, trained):
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(exported), PROMPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["torch"] is False and got["loss"] > 0
    engine = Engine(load(trained), Tokenizer.load(trained))
    assert (
        got["tokens"]
        == engine.generate(PROMPT, loops=4, exit="state:0.02", max_new_tokens=12, temperature=0).token_ids
    )


def test_generate_backend_onnx(exported, capsys):
    args = ["generate", str(exported), "--backend", "onnx", "--prompt", PROMPT, "--max-new-tokens", "8"]
    assert main([*args, "--loops", "1,4", "--temperature", "0", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in records] == [1, 4] and all(r["backend"] == "onnx" for r in records)
    assert records[1]["flops_per_token"] > records[0]["flops_per_token"] > 0
    assert main([*args, "--max-ms-per-token", "1000", "--show-loops"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- ") and "loops per token:" in out
    assert main([*args, "--speculative", "2:4"]) == 2
    assert "--speculative" in capsys.readouterr().err
    assert main([*args, "--variant", "int8", "--loops", "2"]) == 0


def test_a_folder_that_is_not_an_export_is_refused(tmp_path, capsys):
    args = ["generate", str(tmp_path), "--backend", "onnx", "--prompt", "x"]
    assert main(args) == 2
    assert "looped export onnx" in capsys.readouterr().err
