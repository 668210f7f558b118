"""The KV-cached forward pass: append tokens to sequences in a cache, each sequence at its own loop count,
each token free to exit early, with no core compute spent on tokens that have stopped looping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from looped.infer.cache import CacheView, KVCache
from looped.infer.exit import ExitCriterion, Signals
from looped.model.lm import LoopedLM, LoopInputs


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
        exit: an adaptive-exit criterion, checked after each loop (from loop 2 on for those that compare two
            loops); needs P == 1.
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
    if exit is not None and exit.needs_gate and model.exit_gate is None:
        raise ValueError(f"exit {exit!r} needs a model with an exit gate (model.exit_gate), as Ouro has")
    slots = start[:, None] + torch.arange(P)  # (B, P)
    positions = slots.to(device) if positions is None else positions.to(device)
    view = cache.view(rows, slots, key_mask)
    rope = model.rotary(P, positions)  # (B, P, hd/2): each row at its own positions
    last = (lengths - 1).to(device)  # index of each row's last real token

    x, ves = model.embed_inputs(input_ids)
    x = model.run_prelude(x, rope, ves, view)
    used = torch.zeros(B, dtype=torch.long)
    state = logits = None
    if cfg.looped:
        counts = model.loop_counts(loops, B, device)
        inputs = model.loop_inputs(x, rope, ves)
        h0 = model.initial_state(inputs.e, positions) if warm_state is None else warm_state[:, None]
        h, used, logits = _iterate(model, view, h0.to(inputs.e.dtype), inputs, counts, exit, min_loops, last)
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
    """The model's readout and coda (writing the coda's cache), then logits at `last` per row or everywhere."""
    x = model.run_coda(h, rope, ves, view)
    if last is not None:
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
    return model.logits(x)


def _iterate(
    model: LoopedLM,
    view: CacheView,
    h: torch.Tensor,
    inputs: LoopInputs,
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
    B = h.shape[0]
    t_max = int(counts.max())
    view.cache.ensure_loops(t_max)
    used = counts.clone()
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    probe = exit is not None and exit.needs_logits
    logits = prev_logp = prev_state = None
    if exit is not None:
        exit.start(B, h.device)
        prev_state = torch.zeros(B, h.shape[-1], dtype=h.dtype, device=h.device)
    if probe:
        logits = torch.zeros(B, model.cfg.vocab_size, device=h.device)
        prev_logp = torch.zeros_like(logits)
    # Without exit, every row loops at least min(counts) times: those loops need no bookkeeping at all
    # (at batch 1 the per-loop mask and index ops cost as much as a small layer's matmuls).
    together = int(counts.min()) if exit is None else 0
    for t in range(together):
        h = model.loop_step(h, inputs, view, t)
    for t in range(together, t_max):
        idx = ((counts > t) & ~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        if idx.numel() == B:  # everyone still looping: no gathering
            sub, h_a, in_a = view, h, inputs
        else:
            sub, h_a, in_a = view.subset(idx), h[idx], model.select_rows(inputs, idx, rope_per_row=True)
        h_a = model.loop_step(h_a, in_a, sub, t)
        h = h_a if idx.numel() == B else h.index_copy(0, idx, h_a)
        if exit is None:
            continue
        cur = Signals(state=h_a[:, 0])
        if exit.needs_gate:
            cur.gate = model.exit_logit(h_a[:, 0])
        if probe:
            out = _readout(model, h_a, sub, in_a.rope, in_a.ves, last[idx])
            logits[idx] = out
            cur.logprobs = F.log_softmax(out, dim=-1)
        if t >= 1 or not exit.compares:  # most criteria compare two loops
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
