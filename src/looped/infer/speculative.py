"""Self-speculative decoding: a looped model drafts with few loops and verifies with many, in one pass.

The same weights at `draft_loops` loops predict most of what they emit at `loops` loops. So: draft
`lookahead` tokens one at a time at `draft_loops` (cheap decode steps), then run the request's `loops` over
the last accepted token and every drafted one in a single forward pass (as wide as a short prefill, and on
a CPU about as fast as one decode step, which is bound by reading the weights). The verifier's choice after
each position says how many drafts to keep: the longest prefix it agrees with, plus its own next token. The
KV cache is rolled back past the rejected positions by resetting the row's length: entries beyond it are
never visible and are overwritten by the next call.

Greedy, drafts are kept while they equal the verifier's argmax. Sampling, a draft d drawn from the draft
distribution q is kept with probability min(1, p(d)/q(d)) under the verifier's p; the first one refused is
replaced by a sample of the normalised residual max(0, p − q), and when all are kept one more token comes
from p. Each token is then distributed exactly as sampling at `loops` (Leviathan et al. 2023, arXiv
2211.17192; Chen et al. 2023, arXiv 2302.01318). p and q are the request's own sampling distributions
(temperature, top-k, top-p, repetition penalty), so the rule holds for every sampling setting.

The KV cache modes:
- `per-loop`: the verify pass is the plain model over those positions, so the output is that of
  non-speculative decoding at `loops` (greedy: the same tokens, up to the last bit of float arithmetic,
  which differs between a batched and a token-by-token pass).
- `shared`: token-by-token decoding lets a token see earlier ones at their last loop, which a parallel pass
  cannot compute (position i's last loop must finish before position i + 1 starts). The verify pass appends
  its tokens like a prompt chunk instead: they see each other at the current loop, as a shared-cache prefill
  does. Output is then that of a slightly different computation (measured in bench/infer_speculative.py);
  the acceptance rule is exact for it.

`speculative_round` runs one round for a batch of rows, each with its own loops, draft loops, lookahead and
sampling; `looped.infer.engine.Engine` drives it (`Compute(speculative="1:4")` or `"auto"`). `choose` picks
the pair from a calibration (`looped calibrate` measures acceptance and the verify pass's cost). See arXiv
2404.16710 (LayerSkip) and Huginn's `generate_speculative` for the same idea with early-exit layers and
recurrent steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from looped.infer.cache import KVCache
from looped.infer.forward import forward_cached
from looped.model.lm import LoopedLM

MAX_LOOKAHEAD = 16
AUTO_LOOKAHEAD = 8  # `auto` looks no further: acceptance falls along a draft faster than a constant rate says
GAIN_NEEDED = 1.1  # `auto` speculates only where the calibration predicts at least this speed-up


def parse_speculative(value: str | tuple[int, int] | None) -> tuple[int, int] | str | None:
    """ "D:K" or (D, K) → (draft loops, lookahead); "auto" and None pass through; anything else is a
    ValueError that says the form."""
    if value is None or value == "auto":
        return value
    try:
        d, k = value.split(":") if isinstance(value, str) else value
        d, k = int(d), int(k)
    except (ValueError, TypeError):
        d = k = 0
    if not (d >= 1 and 1 <= k <= MAX_LOOKAHEAD):
        raise ValueError(
            f"speculative takes DRAFT_LOOPS:LOOKAHEAD (draft loops ≥ 1, lookahead in [1, {MAX_LOOKAHEAD}], e.g. "
            f"1:4) or 'auto', got {value!r}"
        )
    return d, k


@dataclass
class RowPlan:
    """One row's part in a speculative round, and (filled in by the round) what came of it."""

    row: int  # cache row
    token: int  # the last token chosen, not yet in the cache
    loops: int  # the verifier's loops
    draft_loops: int
    lookahead: int  # drafts to make; 0 verifies `token` alone (a plain decode step)
    probs: Callable[[torch.Tensor, list[int]], torch.Tensor]  # (logits (V,), drafts before) → p (V,)
    greedy: bool
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # out: the kept drafts, then the verifier's next token
    accepted: int = 0  # out: drafts kept


@torch.no_grad()
def speculative_round(model: LoopedLM, cache: KVCache, plans: list[RowPlan]) -> None:
    """Draft, verify in one pass and accept, for every row of `plans`; leaves each row's cache holding its
    token and the kept drafts (the verifier's next token is the row's new last token, not yet cached)."""
    device = model.embed.weight.device
    rows = torch.tensor([p.row for p in plans])
    start = cache.lengths[rows].clone()
    drafts: list[list[int]] = [[] for _ in plans]
    qs: list[list[torch.Tensor]] = [[] for _ in plans]
    for j in range(max(p.lookahead for p in plans)):
        active = [i for i, p in enumerate(plans) if p.lookahead > j]
        last = [drafts[i][-1] if drafts[i] else plans[i].token for i in active]
        out = forward_cached(
            model,
            cache,
            torch.tensor(last, device=device)[:, None],
            rows=rows[active],
            loops=torch.tensor([plans[i].draft_loops for i in active], device=device),
        )
        for b, i in enumerate(active):
            q = plans[i].probs(out.logits[b], drafts[i])
            drafts[i].append(_sample(q, plans[i]))
            qs[i].append(q)
    cache.lengths[rows] = start  # the drafts' cache entries are overwritten by the verify pass
    width = 1 + max(len(d) for d in drafts)
    ids = torch.zeros(len(plans), width, dtype=torch.long)
    for i, p in enumerate(plans):
        ids[i, : 1 + len(drafts[i])] = torch.tensor([p.token, *drafts[i]])
    out = forward_cached(
        model,
        cache,
        ids.to(device),
        rows=rows,
        loops=torch.tensor([p.loops for p in plans], device=device),
        lengths=torch.tensor([1 + len(d) for d in drafts]),
        all_logits=True,
    )
    for i, p in enumerate(plans):
        ps = torch.stack([p.probs(out.logits[i, j], drafts[i][:j]) for j in range(len(drafts[i]) + 1)])
        q = torch.stack(qs[i]) if qs[i] else ps[:0]
        p.accepted, nxt = accept_drafts(drafts[i], q, ps, p)
        p.tokens = drafts[i][: p.accepted] + [nxt]
        cache.lengths[p.row] = start[i] + 1 + p.accepted  # roll back past the refused drafts


def accept_drafts(drafts: list[int], q: torch.Tensor, p: torch.Tensor, plan: RowPlan) -> tuple[int, int]:
    """(drafts kept, the next token) from draft distributions q (k, V) and the verifier's p (k + 1, V): keep
    d_i with probability min(1, p_i(d)/q_i(d)); the first refused is replaced by a sample of max(0, p_i − q_i)
    renormalised; after all, one more token from p_k. Greedy, p and q are one-hot and this keeps a draft
    exactly when it is the verifier's argmax."""
    for i, d in enumerate(drafts):
        ratio = float(p[i, d]) / max(float(q[i, d]), 1e-30)
        if ratio >= 1 or (not plan.greedy and float(torch.rand((), generator=plan.generator)) < ratio):
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = float(residual.sum())
        return i, _sample(residual / total if total > 0 else p[i], plan)
    return len(drafts), _sample(p[len(drafts)], plan)


def _sample(probs: torch.Tensor, plan: RowPlan) -> int:
    if plan.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs.cpu(), 1, generator=plan.generator))


def expected_gain(
    acceptance: float, lookahead: int, draft_ms: float, step_ms: float, verify_ms: float
) -> float:
    """Predicted tokens/s of speculation over plain decoding, for drafts each agreeing with probability
    `acceptance`: a round makes (1 − a^(k+1)) / (1 − a) tokens in k·draft_ms + verify_ms, against one token
    per step_ms."""
    a = min(max(acceptance, 0.0), 0.999999)
    tokens = (1 - a ** (lookahead + 1)) / (1 - a)
    return tokens / (lookahead * draft_ms + verify_ms) * step_ms


def choose(calibration: dict, predict: Callable[[float], float], loops: int) -> tuple[int, int] | None:
    """The (draft loops, lookahead) with the highest predicted gain at `loops`, from a calibration's
    `acceptance` ({loops: {draft loops: rate}}) and `verify_ratio` ({tokens: verify ms / one step's ms}),
    with `predict(T)` the ms of one decode step at T loops; None where no pair gains `GAIN_NEEDED`."""
    measured = {
        int(t): {int(d): float(a) for d, a in m.items()} for t, m in calibration["acceptance"].items()
    }
    ratios = {int(n): float(r) for n, r in calibration["verify_ratio"].items()}
    if not measured or not ratios:
        return None
    near = min(measured, key=lambda t: (abs(t - loops), -t))  # the measured depth nearest the request's
    best, best_gain = None, GAIN_NEEDED
    for d, rate in measured[near].items():
        if d >= loops:
            continue
        for k in range(1, AUTO_LOOKAHEAD + 1):
            n = min(ratios, key=lambda m: abs(m - (k + 1)))
            gain = expected_gain(rate, k, predict(d), predict(loops), predict(loops) * ratios[n])
            if gain > best_gain:
                best, best_gain = (d, k), gain
    return best
