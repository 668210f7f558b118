"""The exportable graphs run eagerly: prelude → T core steps → coda is the model's forward at every injection
and norm placement (the cached graphs, driven by looped.edge's host loop, are checked in tests/edge)."""

from __future__ import annotations

import pytest
import torch
from helpers import ids, randomize_, tiny

from looped import LoopedLM
from looped.errors import ConfigError
from looped.interop.parts import CodaGraph, CoreStepGraph, LoopGraph, PreludeGraph, check_exportable

VARIANTS = [
    {},
    {"injection": "linear"},
    {"injection": "additive", "readout": False, "prelude_norm": False},
    {"injection": "none"},
    {
        "final_norm": "every-loop",
        "coda_layers": 0,
        "readout": False,
        "exit_gate": True,
        "rope_pairing": "half",
        "qk_bias": True,
    },
    {"state_init": "like-init", "block_norm": "sandwich", "mlp": "swiglu", "n_kv_heads": 2},
]


def _model(**overrides) -> LoopedLM:
    torch.manual_seed(0)
    return randomize_(LoopedLM(tiny(**overrides))).eval()


def _uncached(model: LoopedLM, x: torch.Tensor, loops: int) -> torch.Tensor:
    pre, core, coda = PreludeGraph(model), CoreStepGraph(model), CodaGraph(model)
    named = dict(zip(pre.outputs, pre(x), strict=True))
    for _ in range(loops):
        named["state"] = core(*(named[n] for n in core.inputs))[0]
    return coda(*(named[n] for n in coda.inputs))[0]


@pytest.mark.parametrize("overrides", VARIANTS)
@torch.no_grad()
def test_parts_compose_to_the_forward_pass(overrides):
    model = _model(**overrides)
    x = ids(2, 11)
    for loops in (1, 3, 6):
        ref = model(x, loops=loops).logits
        torch.testing.assert_close(_uncached(model, x, loops), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        LoopGraph(model)(x, torch.tensor(5)), model(x, loops=5).logits, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"core_layers": 0}, "nothing loops"),
        ({"layout": "grid", "causal": False}, "layout"),
        ({"attn_window": 4}, "sliding-window"),
        ({"causal": False}, "causal"),
    ],
)
def test_what_the_graphs_do_not_cover_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_exportable(LoopedLM(tiny(**overrides)))
