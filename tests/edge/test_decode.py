"""looped.edge's host loop (KV cache rules, adaptive exit, budgets, sampling) driven through the cached graphs run
eagerly in torch, against the library's own cached forward pass and Engine: the same logic the ONNX graphs get,
for model shapes no export in this suite covers (exit gate, every-loop norm, other injections)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ids, randomize_, tiny

from looped import Config, Engine, LoopedLM
from looped.data.tokenizer import Tokenizer
from looped.edge.decode import Cache, Generation, Timing
from looped.edge.exit import parse_exit
from looped.errors import EdgeError
from looped.infer.cache import KVCache
from looped.infer.forward import forward_cached
from looped.interop.parts import CodaGraph, CoreStepGraph, ExportSource, PreludeGraph

OUROISH = {"final_norm": "every-loop", "coda_layers": 0, "readout": False, "exit_gate": True}


class TorchGraphs:
    """What Generation needs of an EdgeModel (manifest, run, tokenizer), with the cached graphs run in torch."""

    def __init__(self, model: LoopedLM, tokenizer=None) -> None:
        cfg = model.cfg
        self.graphs = {
            f"{g.part}_cached": g
            for g in (cls(model, cached=True) for cls in (PreludeGraph, CoreStepGraph, CodaGraph))
        }
        self.tokenizer = tokenizer
        self.default_loops, self.max_seq_len = cfg.loops, cfg.max_seq_len
        source = ExportSource(Config(model=cfg), model, tokenizer, "shared", cfg.max_seq_len)
        self.manifest = source.manifest()  # the manifest an export writes, less its files

    @torch.no_grad()
    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        g = self.graphs[name]
        out = g(*(torch.from_numpy(np.asarray(feeds[n])) for n in g.inputs))
        return {n: t.numpy() for n, t in zip(g.outputs, out, strict=True)}


def _model(seed: int = 0, **overrides) -> LoopedLM:
    torch.manual_seed(seed)
    return randomize_(LoopedLM(tiny(max_seq_len=48, **overrides)), seed).eval()


@pytest.mark.parametrize("mode", ["shared", "per-loop"])
@pytest.mark.parametrize("overrides", [{}, OUROISH, {"injection": "linear", "state_init": "like-init"}])
def test_cached_steps_equal_forward_cached(mode, overrides):
    """Prompts and single tokens at changing loop counts: per-loop groups appear, later loops read the latest
    entry of tokens that ran fewer (the min(t, T_j) rule), and shared keeps each position's last loop."""
    model = _model(**overrides)
    gen = Generation(TorchGraphs(model), kv_cache=mode)
    cache = KVCache(model.cfg, mode)
    tokens = ids(1, 16)[0].tolist()
    schedule = [(0, 6, 3), (6, 7, 1), (7, 8, 5), (8, 11, 2), (11, 12, 6), (12, 13, 3)]
    for a, b, loops in schedule:
        with torch.no_grad():
            ref = forward_cached(model, cache, torch.tensor([tokens[a:b]]), loops=loops).logits[0]
        logits, used, *_ = gen.step(tokens[a:b], loops)
        assert used == loops
        np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "per-loop"])
@pytest.mark.parametrize(
    ("overrides", "exit"),
    [({}, "state:0.05"), ({}, "kl:0.01"), ({}, "entropy:0.01"), ({}, "argmax:2"), (OUROISH, "gate:0.5")],
)
def test_adaptive_exit_matches_the_engine(mode, overrides, exit):
    """Greedy tokens and the loops each token ran equal the Engine's, for every criterion."""
    tok = Tokenizer.bytes()
    model = _model(seed=1, vocab_size=tok.vocab_size, **overrides)
    engine = Engine(model, tok, kv_cache=mode)
    prompt = "the cat sat"
    ref = engine.generate(prompt, loops=12, exit=exit, min_loops=2, max_new_tokens=12, temperature=0)
    pieces = list(
        Generation(
            TorchGraphs(model, tok),
            loops=12,
            exit=exit,
            min_loops=2,
            kv_cache=mode,
            max_new_tokens=12,
            temperature=0,
        ).stream(prompt)
    )
    assert [p.token for p in pieces] == ref.token_ids
    # looped.edge reports the loops of the step that chose each token: the prompt's, then each decode step's
    assert [p.loops for p in pieces] == [12] + ref.loops[1:]
    assert min(ref.loops[1:]) < 12, "the criterion never fired: the test would not see a wrong exit"


def test_latency_budget_picks_loops_from_measured_times():
    timing = Timing()
    timing.update(fixed_ms=2.0, step_ms=0.5)
    assert timing.loops_for(5.0, 64) == 6  # (5 − 2) / 0.5
    assert timing.loops_for(1.0, 64) == 1  # never below one loop
    assert timing.loops_for(500.0, 16) == 16  # never above the most
    timing.update(fixed_ms=2.0, step_ms=1.5, weight=0.5)  # a busier machine: fewer loops
    assert timing.loops_for(5.0, 64) == 3
    model = _model()
    graphs = TorchGraphs(model)
    gen = Generation(graphs, budget_ms=1e6, loops=7)
    assert gen.loops == 7
    with pytest.raises(EdgeError, match="budget_ms"):
        Generation(graphs, budget_ms=0)


def test_cache_per_loop_groups_start_as_copies_of_the_newest():
    manifest = {
        "max_seq_len": 8,
        "kv_heads": 1,
        "head_dim": 2,
        "layers": {"prelude": 0, "core": 1, "coda": 0},
    }
    cache = Cache(manifest, "per-loop")
    cache.group(0)[0][0][:, :2] = 1.0
    cache.length = 2
    assert np.all(cache.group(2)[0][0][:, :2] == 1.0)  # groups 1 and 2 copied from group 0
    cache.group(0)[0][0][:, 2] = 5.0
    cache.fill_later_loops(used=1, count=1)  # position 2 ran one loop: groups 1, 2 read its loop-1 entry
    assert np.all(cache.group(1)[0][0][:, 2] == 5.0) and np.all(cache.group(2)[0][0][:, 2] == 5.0)
    with pytest.raises(EdgeError, match="kv_cache"):
        Cache(manifest, "paged")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope:1", "unknown exit"),
        ("kl:x", "number"),
        ("kl:-1", "positive"),
        ("argmax:1.5", "whole"),
        ("gate:0.5", "exit gate"),
    ],
)
def test_bad_exit_specs_are_refused(spec, message):
    with pytest.raises(EdgeError, match=message):
        parse_exit(spec, has_gate=False)
    assert parse_exit("none", False) is None and repr(parse_exit("state", False)) == "state:0.01"


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = _model()
    graphs = TorchGraphs(model)
    prompt = ids(1, 5)[0].tolist()

    def tokens(**kw):
        g = Generation(graphs, loops=2, max_new_tokens=8, **kw)
        return [p.token for p in g.stream(prompt)]

    assert tokens(temperature=1.0, seed=3) == tokens(temperature=1.0, seed=3)
    assert tokens(temperature=1.0, seed=3) != tokens(temperature=1.0, seed=4)
    assert tokens(temperature=1.0, top_k=1) == tokens(temperature=0.0)
