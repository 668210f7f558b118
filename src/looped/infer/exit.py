"""Adaptive exit: per-token criteria that stop the loop once more loops would change little.

Each criterion compares what one loop produced with what the loop before produced, for every token still
looping, and says which are done:
- `kl`: KL(p_t ‖ p_{t−1}) of the next-token distributions below τ (Huginn, arXiv 2502.05171, §6);
- `entropy`: |H(p_t) − H(p_{t−1})| below τ;
- `state`: ‖h_t − h_{t−1}‖ / ‖h_t‖ below τ (needs no logits, so it adds no compute per loop);
- `argmax`: the top token unchanged for n loops in a row;
- `gate`: a learned exit gate (`model.exit_gate`, Ouro): loop i exits with probability σ(g_i) times the
  probability that no earlier loop did; stop once that cumulative probability reaches P. It reads one
  number per loop, so it can stop after the first loop and adds almost no compute.
Written as `name:threshold`, e.g. `kl:1e-3`, `argmax:3`, `gate:0.5`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Signals:
    """What one loop produced for the tokens still looping (row b of each tensor is one token)."""

    state: torch.Tensor  # (B, D)
    logprobs: torch.Tensor | None = None  # (B, V), when the criterion needs logits
    gate: torch.Tensor | None = None  # (B,) exit-gate logits, when the criterion needs them


class ExitCriterion:
    """Base class: `done(prev, cur)` → (B,) bool; `needs_logits` says whether the coda must run every loop."""

    name = ""
    needs_logits = True
    needs_gate = False
    compares = True  # reads the loop before too, so the earliest exit is after loop 2

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def start(self, batch: int, device: torch.device) -> None:
        """Called before the first loop of each token batch."""

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        """prev and cur hold the same tokens; `index` are their positions in the batch (for per-token memory)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}:{self.threshold:g}"


class KLExit(ExitCriterion):
    name = "kl"

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        p = cur.logprobs.exp()
        kl = (p * (cur.logprobs - prev.logprobs)).sum(-1)
        return kl < self.threshold


class EntropyExit(ExitCriterion):
    name = "entropy"

    @staticmethod
    def entropy(logprobs: torch.Tensor) -> torch.Tensor:
        return -(logprobs.exp() * logprobs).sum(-1)

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        return (self.entropy(cur.logprobs) - self.entropy(prev.logprobs)).abs() < self.threshold


class StateExit(ExitCriterion):
    name = "state"
    needs_logits = False

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        change = (cur.state - prev.state).norm(dim=-1) / cur.state.norm(dim=-1).clamp_min(1e-12)
        return change < self.threshold


class ArgmaxExit(ExitCriterion):
    name = "argmax"

    def __init__(self, threshold: float) -> None:
        if threshold < 1 or threshold != int(threshold):
            raise ValueError(f"exit argmax:n needs a whole number of loops n ≥ 1, got {threshold:g}")
        super().__init__(int(threshold))
        self.streak = torch.zeros(0, dtype=torch.long)

    def start(self, batch: int, device: torch.device) -> None:
        self.streak = torch.zeros(batch, dtype=torch.long, device=device)

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        same = prev.logprobs.argmax(-1) == cur.logprobs.argmax(-1)
        streak = torch.where(same, self.streak[index] + 1, torch.zeros_like(self.streak[index]))
        self.streak[index] = streak
        return streak >= self.threshold

    def __repr__(self) -> str:
        return f"argmax:{self.threshold}"


class GateExit(ExitCriterion):
    name = "gate"
    needs_logits = False
    needs_gate = True
    compares = False

    def __init__(self, threshold: float) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"exit gate:P needs a probability P in (0, 1], got {threshold:g}")
        super().__init__(threshold)
        self.survive = torch.ones(0)

    def start(self, batch: int, device: torch.device) -> None:
        self.survive = torch.ones(batch, device=device)  # ∏ (1 − σ(g_j)) over the loops so far

    def done(self, prev: Signals, cur: Signals, index: torch.Tensor) -> torch.Tensor:
        survive = self.survive[index] * (1 - torch.sigmoid(cur.gate.float()))
        self.survive[index] = survive
        return 1 - survive >= self.threshold


CRITERIA: dict[str, type[ExitCriterion]] = {
    c.name: c for c in (KLExit, EntropyExit, StateExit, ArgmaxExit, GateExit)
}
DEFAULT_THRESHOLD = {"kl": 1e-3, "entropy": 1e-2, "state": 1e-2, "argmax": 2, "gate": 0.5}


def parse_exit(spec: str | ExitCriterion | None) -> ExitCriterion | None:
    """`kl:1e-3` → KLExit(1e-3); a bare name takes its default threshold; None or "none" → no exit."""
    if spec is None or isinstance(spec, ExitCriterion):
        return spec
    text = spec.strip()
    if text in ("", "none"):
        return None
    name, _, value = text.partition(":")
    name = name.strip().lower()
    if name not in CRITERIA:
        raise ValueError(
            f"unknown exit criterion {name!r}; choose one of {', '.join(CRITERIA)} (e.g. kl:1e-3)"
        )
    if not value.strip():
        return CRITERIA[name](DEFAULT_THRESHOLD[name])
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(
            f"exit {text!r}: the threshold must be a number, e.g. {name}:{DEFAULT_THRESHOLD[name]}"
        ) from None
    if not threshold > 0 or threshold == float("inf"):  # (each criterion checks its own range too)
        raise ValueError(f"exit {text!r}: the threshold must be a positive number")
    return CRITERIA[name](threshold)
