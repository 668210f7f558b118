"""Choosing the next token: repetition penalty, temperature, top-k, top-p, greedy; and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these strings
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be ≥ 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


def token_probs(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """The distribution (V,) float32 that `next_token` draws from: repetition penalty, then one-hot on the
    argmax when greedy, else temperature, top-k and top-p. Speculative decoding compares two of these."""
    logits = _penalized(logits.float(), params, history)
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        cutoff = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(0) - sorted_p >= params.top_p
        probs = probs.clone()
        probs[order[drop]] = 0
    return probs


def next_token(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None, gen: torch.Generator
) -> int:
    """One token from next-token logits (V,), given the ids seen so far (for the repetition penalty)."""
    if params.temperature == 0:
        return int(_penalized(logits.float(), params, history).argmax())
    return int(torch.multinomial(token_probs(logits, params, history).cpu(), 1, generator=gen))


def _penalized(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    if params.repetition_penalty == 1.0 or history is None or not history.numel():
        return logits
    seen = torch.unique(history.to(logits.device))
    picked = logits[seen]
    # CTRL (arXiv 1909.05858): make seen tokens less likely whatever the sign of their logit.
    logits = logits.clone()
    logits[seen] = torch.where(
        picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
    )
    return logits


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
