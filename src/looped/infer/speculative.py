"""Self-speculative decoding: a looped model drafts with few loops and verifies with many, in one pass.

The same weights at `draft_loops` loops predict most of what they emit at `loops` loops. So: draft
`lookahead` tokens one at a time at `draft_loops` (cheap decode steps), then run the request's `loops` over
the last accepted token and every drafted one in a single forward pass (as wide as a short prefill, and on
a CPU about as fast as one decode step, which is bound by reading the weights). The verifier's greedy
choice after each position says how many drafts to keep: the longest prefix that agrees, plus the
verifier's own next token. The KV cache is rolled back past the rejected positions by resetting the row's
length: entries beyond it are never visible and are overwritten by the next call.

With the `per-loop` cache the verify pass is the plain model over those positions, so greedy output is the
non-speculative output at `loops` (up to the last bit of float arithmetic, which differs between a batched
and a token-by-token pass). The `shared` cache makes tokens of one call see each other at the current loop
and earlier tokens at their last, so a parallel verify is another computation than token-by-token decoding
there; `generate_speculative` refuses it.

This module is the decoding rule for one sequence (the reference that the Engine's batched version and the
server will be checked against); see arXiv 2404.16710 (LayerSkip) and Huginn's `generate_speculative` for
the same idea with early-exit layers and recurrent steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from looped.infer.cache import KVCache
from looped.infer.forward import forward_cached
from looped.model.lm import LoopedLM


@dataclass
class SpeculativeResult:
    """The tokens generated and how the drafts fared."""

    token_ids: list[int]
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the verifier agreed with
    rounds: list[int] = field(default_factory=list)  # drafts accepted in each verify pass

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def generate_speculative(
    model: LoopedLM,
    prompt: list[int],
    *,
    loops: int,
    draft_loops: int,
    lookahead: int,
    max_new_tokens: int,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    kv_cache: str = "per-loop",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> SpeculativeResult:
    """Decode one prompt at `loops` loops, drafting `lookahead` tokens at a time at `draft_loops`.

    Args:
        model: a causal LoopedLM in eval mode.
        prompt: token ids.
        loops: the loop count the output is decoded at (the verifier's).
        draft_loops: the loop count drafts are made at (fewer than `loops`).
        lookahead: drafts per verify pass (≥ 1).
        max_new_tokens: the most tokens to generate; a token in `stop_ids` ends generation (not included).
        kv_cache: "per-loop" (the only layout where a parallel verify equals token-by-token decoding).
        temperature: 0 decodes greedily (the plain greedy tokens). Above 0 drafts are sampled from the
            draft distribution q and kept with probability min(1, p/q) under the verifier's p; the first one
            refused is replaced by a sample of the normalised residual max(0, p − q), and when all are kept
            one more token comes from p. Each token is then distributed exactly as sampling at `loops`
            (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).
        generator: the random source for sampling.
    """
    if kv_cache != "per-loop":
        raise ValueError(
            "speculative decoding needs kv_cache = 'per-loop': with the shared cache a parallel verify pass "
            "is another computation than token-by-token decoding"
        )
    if not 1 <= draft_loops < loops:
        raise ValueError(f"draft_loops must lie in [1, loops), got {draft_loops} with loops = {loops}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be ≥ 1, got {lookahead}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    pick = _Picker(temperature, generator)
    device = model.embed.weight.device
    cache = KVCache(
        model.cfg,
        kv_cache,
        rows=1,
        slots=len(prompt) + max_new_tokens + lookahead + 1,
        device=device,
        dtype=model.embed.weight.dtype,
    )
    out = forward_cached(model, cache, torch.tensor([prompt], device=device), loops=loops)
    result = SpeculativeResult(token_ids=[])
    token = pick.sample(pick.probs(out.logits[0]))
    while token not in stop_ids:
        result.token_ids.append(token)
        room = max_new_tokens - len(result.token_ids)
        if room <= 0:
            break
        drafts, q = _draft(model, cache, token, draft_loops, min(lookahead, room), pick)
        p = pick.probs(
            _verify(model, cache, token, drafts, loops)
        )  # (k + 1, V): the verifier after each input
        n, token = pick.accept(drafts, q, p)
        result.drafted += len(drafts)
        result.accepted += n
        result.rounds.append(n)
        for d in drafts[:n]:  # accepted drafts are tokens the verifier itself emits (or samples)
            if d in stop_ids or len(result.token_ids) >= max_new_tokens:
                return result
            result.token_ids.append(d)
        cache.lengths[0] -= len(drafts) - n  # roll back past the rejected positions
        if len(result.token_ids) >= max_new_tokens:
            break
    return result


class _Picker:
    """Greedy or temperature sampling, and the acceptance rule that keeps the verifier's distribution."""

    def __init__(self, temperature: float, generator: torch.Generator | None) -> None:
        self.temperature, self.generator = temperature, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(…, V) float32 logits → probabilities (one-hot on the argmax when greedy)."""
        if self.temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, probs: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(probs.argmax())
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def accept(self, drafts: list[int], q: torch.Tensor, p: torch.Tensor) -> tuple[int, int]:
        """(drafts kept, the next token): keep d_i with probability min(1, p_i(d)/q_i(d)); the first refused
        is replaced by a sample of max(0, p_i − q_i) renormalised; after all, one more token from p_k."""
        for i, d in enumerate(drafts):
            ratio = float(p[i, d]) / max(float(q[i, d]), 1e-30)
            if ratio >= 1 or float(torch.rand((), generator=self.generator)) < ratio:
                continue
            residual = (p[i] - q[i]).clamp_min(0)
            total = float(residual.sum())
            return i, self.sample(residual / total if total > 0 else p[i])
        return len(drafts), self.sample(p[len(drafts)])


def _draft(
    model: LoopedLM, cache: KVCache, token: int, draft_loops: int, k: int, pick: _Picker
) -> tuple[list[int], torch.Tensor]:
    """k tokens after `token` at `draft_loops`, one decode step each, and the draft distributions q (k, V)
    they were picked from; the cache is left where it was."""
    start = int(cache.lengths[0])
    device = model.embed.weight.device
    drafts, qs = [], []
    x = token
    for _ in range(k):
        out = forward_cached(model, cache, torch.tensor([[x]], device=device), loops=draft_loops)
        q = pick.probs(out.logits[0])
        x = pick.sample(q)
        drafts.append(x)
        qs.append(q)
    cache.lengths[0] = start
    return drafts, torch.stack(qs)


def _verify(model: LoopedLM, cache: KVCache, token: int, drafts: list[int], loops: int) -> torch.Tensor:
    """One pass at `loops` over [token, drafts…]: the verifier's logits after each of them, (k + 1, V)."""
    device = model.embed.weight.device
    ids = torch.tensor([[token, *drafts]], device=device)
    return forward_cached(model, cache, ids, loops=loops, all_logits=True).logits[0]
