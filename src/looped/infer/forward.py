"""The KV-cached forward pass: append tokens to sequences in a cache, each sequence at its own loop count,
each token free to exit early, with no core compute spent on tokens that have stopped looping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from looped.infer.cache import CacheView, KVCache
from looped.infer.exit import ExitCriterion, Signals
from looped.model.lm import LoopedLM


@dataclass
class CachedOutput:
    """What `forward_cached` returns for the tokens it appended."""

    logits: torch.Tensor  # (B, V) at each row's last new token, or (B, P, V) with all_logits; float32
    loops: torch.Tensor  # (B,) loops the last new token of each row ran (0 for a standard model)
    state: torch.Tensor | None  # (B, D) recurrent state after the last loop at each row's last new token


@torch.no_grad()
def forward_cached(
    model: LoopedLM,
    cache: KVCache,
    input_ids: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    loops: int | torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    all_logits: bool = False,
    exit: ExitCriterion | None = None,
    min_loops: int = 1,
    warm_state: torch.Tensor | None = None,
) -> CachedOutput:
    """Append `input_ids` (B, P) to rows `rows` of `cache` and return the next-token logits.

    Args:
        model: the model, in eval mode.
        cache: the KV cache; row b's tokens go to slots cache.lengths[rows[b]] onwards.
        rows: (B,) cache rows; default 0..B-1.
        loops: an int, or (B,) loop counts per row; None uses model.cfg.loops. With `exit`, the most loops.
        lengths: (B,) how many of the P tokens of each row are real (right padding); default all P.
            Logits come from the last real token; padding slots are overwritten by later calls.
        positions: (B, P) rotary positions; default the slots (Hugging Face left padding passes its own).
        key_mask: (B, S) False for cached keys never to attend (left padding); S ≥ the new cache length.
        all_logits: return logits at every position (B, P, V) instead of the last real one.
        exit: an adaptive-exit criterion, checked after each loop from loop 2 on (it compares two loops, so
            the earliest exit is after 2 loops); needs P == 1.
        min_loops: no token exits before this many loops.
        warm_state: (B, D) start the loop from this state (the previous token's final state) instead of
            the initial state; needs P == 1.
    """
    cfg = model.cfg
    B, P = input_ids.shape
    device = input_ids.device
    rows = torch.arange(B) if rows is None else rows.cpu()
    lengths = torch.full((B,), P, dtype=torch.long) if lengths is None else lengths.cpu()
    start = cache.lengths[rows]
    if int((start + lengths).max()) > cfg.max_seq_len:
        raise ValueError(f"the sequence would exceed the model's context of {cfg.max_seq_len} tokens")
    if (exit is not None or warm_state is not None) and P != 1:
        raise ValueError("adaptive exit and warm start apply while decoding, one new token per row")
    slots = start[:, None] + torch.arange(P)  # (B, P)
    positions = slots.to(device) if positions is None else positions.to(device)
    view = cache.view(rows, slots, key_mask)
    table = model.rope[:, positions].float()  # (2, B, P, hd/2)
    rope = torch.complex(table[0], table[1])  # (B, P, hd/2): every layer rotates by the same angles
    ves = {int(i): emb(input_ids) for i, emb in model.value_embeds.items()}
    last = (lengths - 1).to(device)  # index of each row's last real token

    x = model.embed(input_ids)  # (B, P, D)
    for i, block in enumerate(model.prelude):
        x = block(x, rope, ves.get(i), view.layer("prelude", i))
    used = torch.zeros(B, dtype=torch.long)
    state = logits = None
    if cfg.looped:
        counts = model._loop_counts(loops, B, device)
        e = model.prelude_norm(x) if model.prelude_norm is not None else x
        h0 = model.initial_state(e, positions) if warm_state is None else warm_state[:, None].to(e.dtype)
        h, used, logits = _iterate(model, view, e, h0, rope, ves, counts, exit, min_loops, last)
        cache.fill_later_loops(rows, slots, used.cpu())
        state = h[torch.arange(B, device=device), last]
        x = h
    if logits is None:  # no per-loop logits: read out once
        logits = _readout(model, x, view, rope, ves, None if all_logits else last)
    elif all_logits:
        logits = logits[:, None]
    cache.lengths[rows] = start + lengths
    return CachedOutput(logits=logits, loops=used.cpu(), state=state)


def _readout(
    model: LoopedLM,
    h: torch.Tensor,
    view: CacheView,
    rope: torch.Tensor,
    ves: dict[int, torch.Tensor],
    last: torch.Tensor | None,
) -> torch.Tensor:
    """State → readout → coda (writing its cache) → norm → head; logits at `last` per row, or everywhere."""
    cfg = model.cfg
    x = model.readout(h) if model.readout is not None else h
    offset = cfg.prelude_layers + cfg.core_layers
    for i, block in enumerate(model.coda):
        x = block(x, rope, ves.get(offset + i), view.layer("coda", i))
    if last is not None:
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
    logits = model.head(model.final_norm(x)).float()
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


def _iterate(
    model: LoopedLM,
    view: CacheView,
    e: torch.Tensor,
    h: torch.Tensor,
    rope: torch.Tensor,
    ves: dict[int, torch.Tensor],
    counts: torch.Tensor,
    exit: ExitCriterion | None,
    min_loops: int,
    last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loops for every row until its count or its exit; returns (final states, loops used, logits or None).

    Sequences start together (loop t of every row runs in the same iteration) and drop out of the batch when
    done, so a row that has stopped costs no core compute. With a criterion that reads logits, the coda and
    head run after every loop for the rows still looping, and the logits of a row's last loop are its output.
    """
    B = e.shape[0]
    t_max = int(counts.max())
    view.cache.ensure_loops(t_max)
    p = model.cfg.prelude_layers
    u = model.injection.prepare(e)
    used = counts.clone()
    done = torch.zeros(B, dtype=torch.bool, device=e.device)
    probe = exit is not None and exit.needs_logits
    logits = prev_logp = prev_state = None
    if exit is not None:
        exit.start(B, e.device)
        prev_state = torch.zeros(B, e.shape[-1], dtype=e.dtype, device=e.device)
    if probe:
        logits = torch.zeros(B, model.cfg.vocab_size, device=e.device)
        prev_logp = torch.zeros_like(logits)
    for t in range(t_max):
        idx = ((counts > t) & ~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        if idx.numel() == B:  # everyone still looping: no gathering
            sub, h_a, u_a, rope_a, ves_a = view, h, u, rope, ves
        else:
            sub, h_a = view.subset(idx), h[idx]
            u_a, rope_a = model.injection.select(u, idx), rope[idx]
            ves_a = {i: v[idx] for i, v in ves.items()}
        h_a = model.injection.step(h_a, u_a)
        for i, block in enumerate(model.core):
            h_a = block(h_a, rope_a, ves_a.get(p + i), sub.layer("core", i, t))
        h = h_a if idx.numel() == B else h.index_copy(0, idx, h_a)
        if exit is None:
            continue
        cur = Signals(state=h_a[:, 0])
        if probe:
            out = _readout(model, h_a, sub, rope_a, ves_a, last[idx])
            logits[idx] = out
            cur.logprobs = F.log_softmax(out, dim=-1)
        if t >= 1:  # a criterion compares two loops
            prev = Signals(state=prev_state[idx], logprobs=None if prev_logp is None else prev_logp[idx])
            stop = exit.done(prev, cur, idx) & (counts[idx] > t + 1)
            if t + 1 >= min_loops and bool(stop.any()):
                stopped = idx[stop]
                done[stopped] = True
                used[stopped] = t + 1
        prev_state[idx] = cur.state
        if probe:
            prev_logp[idx] = cur.logprobs
    return h, used, logits
