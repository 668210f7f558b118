"""Self-speculative decoding: drafts at few loops, one verify pass at many; greedy output equals plain
decoding at the verifier's loops, whatever the drafts were."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny

from looped.infer.engine import Engine
from looped.infer.speculative import generate_speculative
from looped.model.lm import LoopedLM

PROMPT = [3, 5, 7, 11, 13]


@pytest.fixture(scope="module")
def model():
    return randomize_(LoopedLM(tiny(state_init="like-init", max_seq_len=64)), seed=3).eval()


@pytest.mark.parametrize(("loops", "draft_loops", "lookahead"), [(4, 1, 3), (6, 2, 5), (3, 2, 1)])
def test_greedy_output_equals_plain_decoding(model, loops, draft_loops, lookahead):
    plain = Engine(model, kv_cache="per-loop").generate(PROMPT, loops=loops, max_new_tokens=20, temperature=0)
    spec = generate_speculative(
        model, PROMPT, loops=loops, draft_loops=draft_loops, lookahead=lookahead, max_new_tokens=20
    )
    assert spec.token_ids == plain.token_ids
    assert 0 <= spec.accepted <= spec.drafted and sum(spec.rounds) == spec.accepted
    assert max(spec.rounds) <= lookahead


def test_drafts_that_always_agree_are_all_accepted():
    """A core that adds nothing makes every loop count give the same tokens: every draft is kept, and each
    verify pass adds lookahead + 1 tokens."""
    m = randomize_(LoopedLM(tiny(injection="none", prelude_norm=False, readout=False)), seed=4).eval()
    with torch.no_grad():
        for block in m.core:
            block.attn.wo.weight.zero_()
            block.mlp.w_out.weight.zero_()
    plain = Engine(m, kv_cache="per-loop").generate(PROMPT, loops=4, max_new_tokens=13, temperature=0)
    spec = generate_speculative(m, PROMPT, loops=4, draft_loops=1, lookahead=3, max_new_tokens=13)
    assert spec.token_ids == plain.token_ids
    assert spec.acceptance == 1.0 and spec.rounds == [3, 3, 3]  # 1 + 3 × (3 + 1) = 13 tokens


def test_stop_ids_and_refusals(model):
    plain = Engine(model, kv_cache="per-loop").generate(PROMPT, loops=4, max_new_tokens=12, temperature=0)
    stop = plain.token_ids[5]
    spec = generate_speculative(
        model, PROMPT, loops=4, draft_loops=1, lookahead=4, max_new_tokens=12, stop_ids={stop}
    )
    assert spec.token_ids == plain.token_ids[: plain.token_ids.index(stop)]
    with pytest.raises(ValueError, match="per-loop"):
        generate_speculative(
            model, PROMPT, loops=4, draft_loops=1, lookahead=2, max_new_tokens=4, kv_cache="shared"
        )
    with pytest.raises(ValueError, match="draft_loops"):
        generate_speculative(model, PROMPT, loops=4, draft_loops=4, lookahead=2, max_new_tokens=4)


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

    def counts() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        c = torch.zeros(6, 6)
        for _ in range(n):
            out = generate_speculative(
                m,
                prompt,
                loops=4,
                draft_loops=1,
                lookahead=2,
                max_new_tokens=2,
                temperature=temperature,
                generator=gen,
            )
            c[out.token_ids[0], out.token_ids[1]] += 1
        return c

    threshold = 66.6  # χ² with 35 degrees of freedom at p = 0.001
    assert _chi2(counts(), expected) < threshold
    draft_only = _joint(m, prompt, 1, temperature) * n
    assert _chi2(draft_only, expected) > 4 * threshold  # the two distributions are far apart
    monkeypatch.setattr(spec._Picker, "accept", lambda self, drafts, q, p: (len(drafts), self.sample(p[-1])))
    assert _chi2(counts(), expected) > threshold  # always keeping the drafts is caught
