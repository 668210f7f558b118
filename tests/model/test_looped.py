"""LoopedLM behaviour against independent references: plain stacks, unrolled loops, one sequence at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ids, randomize_, tiny

from looped import LoopedLM
from looped.config import ConfigError
from looped.model.accounting import standard_config
from looped.model.layers import rope_grid_table, rope_table


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp": "swiglu", "n_kv_heads": 2},
        {"mlp": "gelu", "block_norm": "sandwich", "qk_norm": False},
        {"injection": "linear", "state_init": "normal", "logit_softcap": 5.0},
        {"injection": "additive", "tie_embeddings": False, "readout": False, "prelude_norm": False},
    ],
)
def test_shapes_and_finite_loss(overrides):
    model = randomize_(LoopedLM(tiny(**overrides)))
    x = ids()
    out = model(x, labels=x, loops=torch.tensor([1, 4]))
    assert out.logits.shape == (2, 12, 97) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loops.tolist() == [1, 4] and out.state_norms.shape == (4,)
    out.loss.backward()
    if overrides.get("logit_softcap"):
        assert out.logits.abs().max() <= 5.0


def test_embeds_equal_their_token_ids():
    model = randomize_(LoopedLM(tiny(value_embeds=False))).eval()
    x = ids()
    want = model(x, loops=3).logits
    assert torch.allclose(model(None, loops=3, embeds=model.embed(x)).logits, want, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, embeds=model.embed(x))
    with pytest.raises(ValueError, match="value embeddings"):
        LoopedLM(tiny(value_embeds=True))(None, embeds=model.embed(x))


def test_one_loop_equals_plain_stack():
    # Additive injection from a zero state, no prelude norm, no readout: one loop is exactly a plain stack of
    # prelude, core and coda blocks, which a standard model (core_layers = 0) built by the same code runs.
    cfg = tiny(injection="additive", prelude_norm=False, readout=False)
    looped = randomize_(LoopedLM(cfg)).eval()
    plain = LoopedLM(standard_config(cfg, cfg.n_layers)).eval()
    assert plain.cfg.ve_layers == cfg.ve_layers
    sd = looped.state_dict()
    mapped = {}
    for key, value in sd.items():
        part, rest = key.split(".", 1) if "." in key else (key, "")
        if part in ("core", "coda"):
            index, tail = rest.split(".", 1)
            offset = cfg.prelude_layers + (cfg.core_layers if part == "coda" else 0)
            mapped[f"prelude.{offset + int(index)}.{tail}"] = value
        else:
            mapped[key] = value
    plain.load_state_dict(mapped)
    x = ids()
    torch.testing.assert_close(looped(x, loops=1).logits, plain(x).logits, rtol=0, atol=1e-5)


def test_loops_equal_manual_unrolling():
    # h_t = core(Ā h_{t-1} + B̄ e), written out by hand from the model's own modules.
    model = randomize_(LoopedLM(tiny(state_init="zero"))).eval()
    x = ids()
    T = 3
    with torch.no_grad():
        rope = model.rope[:, : x.shape[1]]
        ves = {int(i): emb(x) for i, emb in model.value_embeds.items()}
        h = model.embed(x)
        h = model.prelude[0](h, rope, ves.get(0))
        e = model.prelude_norm(h)
        decay, dt = model.injection.rates()
        state = torch.zeros_like(e)
        for _ in range(T):
            state = decay * state + dt * (e @ model.injection.B.weight.T)
            for j, block in enumerate(model.core):
                state = block(state, rope, ves.get(1 + j))
        y = model.coda[0](model.readout(state), rope, ves.get(3))
        logits = model.head(model.final_norm(y))
        torch.testing.assert_close(model(x, loops=T).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("injection", ["diagonal", "linear", "additive"])
def test_per_sequence_loops_equal_each_sequence_alone(injection):
    model = randomize_(LoopedLM(tiny(injection=injection))).eval()
    x = ids(batch=3)
    loops = torch.tensor([1, 4, 2])
    with torch.no_grad():
        batched = model(x, loops=loops).logits
        for b in range(3):
            alone = model(x[b : b + 1], loops=int(loops[b])).logits
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-5)


def test_per_sequence_truncated_gradients_equal_each_sequence_alone():
    # Gradients through the last min(T_b, k) loops of each sequence, summed, equal the batched gradient.
    cfg = tiny()
    model = randomize_(LoopedLM(cfg)).train()
    x = ids(batch=2)
    loops, k = torch.tensor([1, 4]), 2

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = model(x, loops=loops, backprop_loops=k)
    batched = grads(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten(), reduction="sum"))
    total = {}
    for b in range(2):
        o = model(x[b : b + 1], loops=int(loops[b]), backprop_loops=k)
        for n, g in grads(
            torch.nn.functional.cross_entropy(o.logits.flatten(0, 1), x[b], reduction="sum")
        ).items():
            total[n] = total.get(n, 0) + g
    assert batched.keys() == total.keys()
    for n in batched:
        torch.testing.assert_close(batched[n], total[n], rtol=1e-4, atol=1e-5, msg=n)


def test_forward_only_loops_leave_no_autograd_history():
    model = randomize_(LoopedLM(tiny())).train()
    x = ids()
    grad_modes = []
    hook = model.core[0].register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))

    def saved_tensors(loops: int) -> int:
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, labels=x, loops=loops, backprop_loops=2).loss.backward()
        return count

    n3 = saved_tensors(3)
    assert grad_modes == [False, True, True]
    grad_modes.clear()
    n9 = saved_tensors(9)
    assert grad_modes == [False] * 7 + [True, True]
    assert n9 == n3  # what autograd keeps does not grow with forward-only loops
    hook.remove()
    # Gradients reach the prelude and the core through the gradient loops.
    assert model.prelude[0].attn.wq.weight.grad.abs().sum() > 0
    assert model.core[0].mlp.w_in.weight.grad.abs().sum() > 0


def test_eval_mode_is_deterministic_and_uses_configured_loops():
    model = randomize_(LoopedLM(tiny(state_init="normal", loops=3)))
    x = ids()
    model.eval()
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, model(x, loops=3).logits, rtol=0, atol=0)
        assert not torch.allclose(a, model(x, loops=1).logits)
        model.train()
        assert not torch.allclose(model(x).logits, model(x).logits)  # fresh noise per call in training


def test_invalid_loops_are_clear_errors():
    model = LoopedLM(tiny())
    x = ids()
    with pytest.raises(ValueError, match="loops must be ≥ 1"):
        model(x, loops=0)
    with pytest.raises(ValueError, match="shape"):
        model(x, loops=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_standard_model_ignores_loops():
    cfg = dataclasses.replace(tiny(), core_layers=0, spectral_norm=[])
    model = randomize_(LoopedLM(cfg)).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x, loops=1).logits, model(x, loops=5).logits)
    assert model.injection is None and model.readout is None


def test_like_init_state_is_a_truncated_normal_at_the_init_std():
    model = LoopedLM(tiny(state_init="like-init", width=64, n_heads=4)).eval()
    h = model.initial_state(torch.zeros(8, 32, 64))
    std = model.cfg.resolved_init_std
    assert h.abs().max() <= 3 * std
    assert float(h.std()) == pytest.approx(std * 0.986, rel=0.05)  # the std of N(0, σ²) cut at ±3σ
    assert float((h.abs() > 2.99 * std).float().mean()) < 0.001  # truncated, not clamped onto the edges
    torch.testing.assert_close(h, model.initial_state(torch.zeros(8, 32, 64)), rtol=0, atol=0)


def test_encoder_attends_both_ways_and_the_engine_refuses_it():
    """model.causal = false: a later token changes an earlier position's output; a causal model's does not."""
    from looped.infer.engine import Engine

    x = ids(2, 12, vocab=97)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 97
    for causal in (True, False):
        torch.manual_seed(0)
        model = randomize_(LoopedLM(tiny(causal=causal))).eval()
        with torch.no_grad():
            a, b = model(x, loops=3).logits, model(y, loops=3).logits
        assert torch.allclose(a[:, :-1], b[:, :-1]) == causal
    with pytest.raises(ValueError, match="causal"):
        Engine(model)


def test_attention_window_passes_information_on_one_window_per_layer():
    """attn_window = 1 in an encoder with 1/1/1 layers: a token reaches 2 + T positions after T loops."""
    cfg = tiny(
        causal=False, attn_window=1, prelude_layers=1, core_layers=1, coda_layers=1, value_embeds=False
    )
    torch.manual_seed(0)
    model = randomize_(LoopedLM(cfg)).eval()
    x = ids(1, 16, vocab=97)
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 97
    for loops in (1, 4, 8):
        with torch.no_grad():
            changed = (model(x, loops=loops).logits - model(y, loops=loops).logits).abs().amax(-1)[
                0
            ] > 0  # unreached rows are bit-identical
        reach = 2 + loops
        assert changed[max(0, 12 - reach) :].all() and not changed[: max(0, 12 - reach)].any()


def test_grid_layout_passes_information_on_in_two_dimensions():
    """layout = grid, attn_window = 1, 1/1/1 layers: a changed cell reaches the cells within 2 + T rows and
    columns after T loops, at any side, and the rotary table turns half the pairs by row, half by column."""
    cfg = tiny(
        causal=False,
        attn_window=1,
        layout="grid",
        max_seq_len=128,
        prelude_layers=1,
        core_layers=1,
        coda_layers=1,
        value_embeds=False,
    )
    torch.manual_seed(0)
    model = randomize_(LoopedLM(cfg)).eval()
    for side in (5, 9):
        x = ids(1, side * side, vocab=97)
        y = x.clone()
        y[0, side + 1] = (y[0, side + 1] + 1) % 97  # cell (1, 1)
        for loops in (1, 2):
            with torch.no_grad():
                diff = (model(x, loops=loops).logits - model(y, loops=loops).logits).abs().amax(-1)[0]
            reach = 2 + loops
            r, c = torch.arange(side * side) // side, torch.arange(side * side) % side
            near = ((r - 1).abs() <= reach) & ((c - 1).abs() <= reach)
            assert torch.equal(diff > 0, near)
    with pytest.raises(ValueError, match="square"):
        model(ids(1, 10, vocab=97))
    table = rope_grid_table(8, 3, 10000.0)
    one_d = rope_table(4, 3, 10000.0)
    assert table.shape == (2, 9, 4)
    assert torch.equal(table[:, 5, :2], one_d[:, 1]) and torch.equal(table[:, 5, 2:], one_d[:, 2])  # (1, 2)
    with pytest.raises(ConfigError, match="grid"):
        tiny(layout="grid")  # a causal model


def test_packed_inputs_are_not_a_sequence_length():
    """An engine that packs several sequences into one row (vLLM) may pass more tokens than the context."""
    model = LoopedLM(tiny(max_seq_len=8)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model.embed_inputs(ids)
    x, _ = model.embed_inputs(ids, packed=True)
    assert x.shape == (1, 12, model.cfg.width)
