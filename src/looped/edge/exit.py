"""Adaptive exit on the device: the criteria of `looped.infer.exit` in numpy, for one token at a time.

`state` needs nothing but the loop state; `gate` reads the exit gate's logit the core step returns; `kl`,
`entropy` and `argmax` need the next-token distribution after every loop, so the coda runs each loop (its
keys and values are only kept from the last one).
"""

from __future__ import annotations

import numpy as np

from looped.errors import EdgeError

DEFAULT_THRESHOLD = {"kl": 1e-3, "entropy": 1e-2, "state": 1e-2, "argmax": 2, "gate": 0.5}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class Exit:
    """One criterion: `reset()` before each token, then `done(state, logprobs, gate)` after each loop."""

    def __init__(self, name: str, threshold: float) -> None:
        self.name, self.threshold = name, threshold
        self.needs_logits = name in ("kl", "entropy", "argmax")  # the coda runs every loop
        self.needs_gate = name == "gate"
        self.reset()

    def reset(self) -> None:
        self.prev_state = self.prev_logprobs = None
        self.streak, self.survive = 0, 1.0

    def done(self, state: np.ndarray, logprobs: np.ndarray | None, gate: float | None) -> bool:
        name, tau = self.name, self.threshold
        if name == "gate":  # cumulative exit probability 1 − ∏(1 − σ(g)) reaches P
            self.survive *= 1 - 1 / (1 + np.exp(-gate))
            return 1 - self.survive >= tau
        prev_state, prev_lp = self.prev_state, self.prev_logprobs
        self.prev_state, self.prev_logprobs = state, logprobs
        if prev_state is None:  # the others compare two loops: the earliest exit is after the second
            return False
        if name == "state":
            return float(np.linalg.norm(state - prev_state) / max(np.linalg.norm(state), 1e-12)) < tau
        if name == "kl":
            return float((np.exp(logprobs) * (logprobs - prev_lp)).sum()) < tau
        if name == "entropy":
            h = -(np.exp(logprobs) * logprobs).sum()
            return abs(float(h + (np.exp(prev_lp) * prev_lp).sum())) < tau
        same = int(logprobs.argmax()) == int(prev_lp.argmax())
        self.streak = self.streak + 1 if same else 0
        return self.streak >= tau

    def __repr__(self) -> str:
        return f"{self.name}:{self.threshold:g}"


def parse_exit(spec: str | None, has_gate: bool) -> Exit | None:
    """`kl:1e-3` → the KL criterion at 1e-3; a bare name takes its default; None or "none" → no exit."""
    text = (spec or "").strip()
    if text in ("", "none"):
        return None
    name, _, value = text.partition(":")
    name = name.strip().lower()
    if name not in DEFAULT_THRESHOLD:
        raise EdgeError(f"unknown exit criterion {name!r}; choose one of {', '.join(DEFAULT_THRESHOLD)}")
    try:
        threshold = float(value) if value.strip() else float(DEFAULT_THRESHOLD[name])
    except ValueError:
        raise EdgeError(f"exit {text!r}: the threshold must be a number") from None
    if not 0 < threshold < float("inf"):
        raise EdgeError(f"exit {text!r}: the threshold must be a positive number")
    if name == "argmax" and threshold != int(threshold):
        raise EdgeError(f"exit {text!r}: argmax:n needs a whole number of loops")
    if name == "gate" and (threshold > 1 or not has_gate):
        raise EdgeError(f"exit {text!r}: gate:P needs a model with an exit gate and P in (0, 1]")
    return Exit(name, threshold)
