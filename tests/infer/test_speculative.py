"""Self-speculative decoding: drafts at few loops, one verify pass at many; greedy output equals plain
decoding at the verifier's loops with the per-loop cache, whatever the drafts were, for batches of rows that
keep different numbers of drafts; sampling keeps the verifier's distribution."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny

from looped.infer.budget import Profile, calibrate_speculation
from looped.infer.engine import Compute, Engine
from looped.infer.speculative import choose, expected_gain, parse_speculative
from looped.model.lm import LoopedLM

PROMPT = [3, 5, 7, 11, 13]
PROMPTS = [PROMPT, [2, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1]]


@pytest.fixture(scope="module")
def model():
    return randomize_(LoopedLM(tiny(state_init="like-init", max_seq_len=64)), seed=3).eval()


def _agreeing_model() -> LoopedLM:
    """A core that adds nothing: every loop count gives the same tokens, so every draft is kept."""
    m = randomize_(LoopedLM(tiny(injection="none", prelude_norm=False, readout=False)), seed=4).eval()
    with torch.no_grad():
        for block in m.core:
            block.attn.wo.weight.zero_()
            block.mlp.w_out.weight.zero_()
    return m


@pytest.mark.parametrize(("loops", "spec"), [(4, "1:3"), (6, "2:5"), (3, (2, 1))])
def test_greedy_output_equals_plain_decoding(model, loops, spec):
    engine = Engine(model, kv_cache="per-loop")
    plain = engine.generate(PROMPT, loops=loops, max_new_tokens=20, temperature=0)
    out = engine.generate(PROMPT, loops=loops, max_new_tokens=20, temperature=0, speculative=spec)
    assert out.token_ids == plain.token_ids
    assert out.loops == [loops] * len(out.token_ids)
    assert 0 <= out.accepted <= out.drafted and out.speculative == parse_speculative(spec)


def test_a_batch_of_rows_with_their_own_loops_and_acceptance(model):
    """Rows at different loops keep different numbers of drafts per round; each equals its plain decoding."""
    engine = Engine(model, kv_cache="per-loop")
    loops = [4, 6, 3]
    plain = engine.generate(PROMPTS, loops=loops, max_new_tokens=17, temperature=0)
    spec = engine.generate(PROMPTS, loops=loops, max_new_tokens=17, temperature=0, speculative="1:4")
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert all(g.drafted > 0 for g in spec)
    assert not engine.busy and engine.cache.lengths.sum() == 0


def test_requests_join_a_running_speculative_batch(model):
    """Continuous batching: a request submitted mid-way is prefilled while others are between rounds."""
    engine = Engine(model, kv_cache="per-loop")
    params = engine.sampling(max_new_tokens=12, temperature=0)
    first = engine.submit(PROMPT, params, Compute(loops=4, speculative="1:3"))
    engine.step()
    engine.step()
    second = engine.submit(PROMPTS[2], params, Compute(loops=5, speculative="2:2"))
    third = engine.submit(PROMPTS[1], params, Compute(loops=5))  # plain decoding beside speculation
    while engine.busy:
        engine.step()
    for req, loops, prompt in ((first, 4, PROMPT), (second, 5, PROMPTS[2]), (third, 5, PROMPTS[1])):
        plain = Engine(model, kv_cache="per-loop").generate(
            prompt, loops=loops, max_new_tokens=12, temperature=0
        )
        assert engine.result(req).token_ids == plain.token_ids


def test_drafts_that_always_agree_are_all_accepted():
    """Each verify pass adds lookahead + 1 tokens when every draft is kept, in both cache modes."""
    m = _agreeing_model()
    for kv in ("per-loop", "shared"):
        engine = Engine(m, kv_cache=kv)
        plain = engine.generate(PROMPT, loops=4, max_new_tokens=13, temperature=0)
        spec = engine.generate(PROMPT, loops=4, max_new_tokens=13, temperature=0, speculative="1:3")
        assert spec.token_ids == plain.token_ids
        assert spec.acceptance == 1.0 and spec.drafted == 9  # 1 + 3 × (3 + 1) = 13 tokens in 3 rounds


def test_shared_cache_verifies_a_window_like_a_prompt_chunk(model):
    """With the shared cache the tokens of a verify pass see each other at the current loop, as a prefill
    does: with lookahead 1 the first round's tokens are those of prefilling prompt + token, and the output
    stays close to (not always equal to) token-by-token decoding."""
    engine = Engine(model, kv_cache="shared")
    spec = engine.generate(PROMPT, loops=4, max_new_tokens=2, temperature=0, speculative="1:1")
    first = engine.generate(PROMPT, loops=4, max_new_tokens=1, temperature=0).token_ids
    # the second token: the model over prompt + first token as one chunk (no cache), at 4 loops
    with torch.no_grad():
        chunk = model(torch.tensor([PROMPT + first]), loops=4).logits[0, -1].argmax()
    assert spec.token_ids == first + [int(chunk)]


def test_stop_ids_context_and_refusals(model):
    engine = Engine(model, kv_cache="per-loop")
    plain = engine.generate(PROMPT, loops=4, max_new_tokens=12, temperature=0)
    stop = plain.token_ids[5]
    engine.stop_ids = {stop}
    spec = engine.generate(PROMPT, loops=4, max_new_tokens=12, temperature=0, speculative="1:4")
    assert spec.token_ids == plain.token_ids[: plain.token_ids.index(stop)] and spec.finish_reason == "stop"
    engine.stop_ids = set()
    long = engine.generate(PROMPT, loops=4, max_new_tokens=200, temperature=0, speculative="1:4")
    assert len(PROMPT) + len(long.token_ids) == model.cfg.max_seq_len + 1  # the last token is never cached
    with pytest.raises(ValueError, match="draft loops must be fewer"):
        engine.generate(PROMPT, loops=4, speculative="4:2")
    with pytest.raises(ValueError, match="adaptive exit"):
        engine.generate(PROMPT, loops=4, speculative="1:2", exit="kl:1e-3")
    with pytest.raises(ValueError, match="DRAFT_LOOPS:LOOKAHEAD"):
        engine.generate(PROMPT, loops=4, speculative="1-2")


def test_budgets_pick_the_verifiers_loops(model):
    """A FLOP budget picks loops as without speculation; the tokens follow those loops."""
    engine = Engine(model, kv_cache="per-loop")
    flops = model.flops_per_token(5, 16)
    plain = engine.generate(PROMPT, max_flops_per_token=flops, max_new_tokens=10, temperature=0)
    spec = engine.generate(
        PROMPT, max_flops_per_token=flops, max_new_tokens=10, temperature=0, speculative="1:3"
    )
    assert spec.token_ids == plain.token_ids and spec.loops == plain.loops


def test_auto_picks_from_the_calibration():
    """With drafts that always agree a calibration finds acceptance 1, and auto speculates; the pair comes
    from the measured costs, and the tokens are still plain decoding's."""
    m = _agreeing_model()
    measured = calibrate_speculation(m, [4, 8], kv_cache="per-loop", tokens=12, repeats=1)
    assert measured["acceptance"][8] == {1: 1.0, 2: 1.0, 4: 1.0, 7: 1.0}
    assert sorted(measured["verify_ratio"]) == [1, 2, 3, 5, 9] and measured["verify_ratio"][1] == 1.0
    # costs fixed here (timings on a shared machine are noise): 1 ms + 1 ms per loop, verify 1.2× a step
    profile = Profile(fit={1: (1.0, 1.0)}, device="cpu", dtype="float32")
    profile.speculative = {"acceptance": measured["acceptance"], "verify_ratio": {1: 1.0, 5: 1.2}}
    engine = Engine(m, kv_cache="per-loop", profile=profile)
    out = engine.generate(PROMPT, loops=8, max_new_tokens=12, temperature=0, speculative="auto")
    plain = engine.generate(PROMPT, loops=8, max_new_tokens=12, temperature=0)
    assert out.token_ids == plain.token_ids and out.speculative is not None
    assert out.speculative == choose(profile.speculative, lambda t: profile.predict(1, t), 8) == (1, 8)


def test_choose_follows_the_predicted_gain():
    calib = {"acceptance": {8: {1: 0.9, 4: 0.99}}, "verify_ratio": {1: 1.0, 2: 1.05, 5: 1.2, 9: 1.6}}
    step = {1: 2.0, 4: 5.0, 8: 9.0}.__getitem__
    d, k = choose(calib, step, 8)
    best = expected_gain(0.9 if d == 1 else 0.99, k, step(d), step(8), step(8) * 1.2)
    assert best > 1.1 and d in (1, 4)
    assert choose({"acceptance": {8: {1: 0.05}}, "verify_ratio": {1: 1.0, 2: 1.1}}, step, 8) is None
    assert expected_gain(0.0, 3, 1.0, 9.0, 9.0) == pytest.approx(1.0 / 12.0 * 9.0)


def _joint(model, prompt, loops, temperature):
    """The exact distribution of the first two sampled tokens at `loops`: p(t1)·p(t2 | t1), (V, V)."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]), loops=loops).logits[0, -1] / temperature, -1)
        V = first.shape[0]
        rows = torch.tensor([prompt + [t] for t in range(V)])
        second = torch.softmax(model(rows, loops=loops).logits[:, -1] / temperature, -1)  # (V, V)
    return first[:, None] * second


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_sampling_keeps_the_verifiers_distribution(monkeypatch):
    """Pairs of tokens sampled speculatively (drafts at 1 loop, verified at 4) follow the 4-loop model's own
    joint distribution; accepting every draft instead follows another one, and the same test tells."""
    import looped.infer.speculative as spec

    m = randomize_(LoopedLM(tiny(vocab_size=6, state_init="zero")), seed=11).eval()
    prompt, n, temperature = [1, 2, 3], 1000, 1.0
    expected = _joint(m, prompt, 4, temperature) * n

    engine = Engine(m, kv_cache="per-loop")

    def counts() -> torch.Tensor:
        c = torch.zeros(6, 6)
        for seed in range(n):
            out = engine.generate(
                prompt,
                loops=4,
                speculative="1:2",
                max_new_tokens=2,
                temperature=temperature,
                top_k=None,
                seed=seed,
            )
            c[out.token_ids[0], out.token_ids[1]] += 1
        return c

    threshold = 66.6  # χ² with 35 degrees of freedom at p = 0.001
    assert _chi2(counts(), expected) < threshold
    draft_only = _joint(m, prompt, 1, temperature) * n
    assert _chi2(draft_only, expected) > 4 * threshold  # the two distributions are far apart
    monkeypatch.setattr(
        spec, "accept_drafts", lambda drafts, q, p, plan: (len(drafts), spec._sample(p[-1], plan))
    )
    assert _chi2(counts(), expected) > threshold  # always keeping the drafts is caught
