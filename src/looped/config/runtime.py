"""The run-time config sections: infer (generation defaults) and serve (the HTTP server)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from looped.config.section import ConfigError, Section, doc


@dataclass
class InferConfig(Section):
    """Defaults for generation (`looped generate`, `looped chat`, the Engine); each request may override them."""

    _section: typing.ClassVar[str] = "infer"

    kv_cache: Literal["per-loop", "shared"] = doc(
        "shared", "KV cache for core layers: shared (one entry per position) or per-loop (one per loop)."
    )
    max_loops: int = doc(64, "The most loops a request may ask for; more is an error.")
    exit: str = doc(
        "none", "Adaptive exit: none, or criterion:threshold (kl:1e-3, entropy:1e-2, state:1e-2, argmax:2)."
    )
    min_loops: int = doc(1, "With adaptive exit, no token stops before this many loops.")
    warm_start: bool = doc(False, "Start each token's loop from the previous token's final state.")
    max_new_tokens: int = doc(128, "Tokens to generate per request unless it says otherwise.")
    temperature: float = doc(0.8, "Sampling temperature; 0 is greedy.")
    top_k: int | None = doc(50, "Sample among the k most likely tokens; None keeps all.")
    top_p: float | None = doc(None, "Nucleus sampling: the smallest set of tokens with probability ≥ p.")
    repetition_penalty: float = doc(1.0, "Divide logits of tokens already in the text (CTRL); 1 is off.")

    def validate(self) -> None:
        if self.max_loops < 1:
            raise ConfigError(f"infer.max_loops must be ≥ 1, got {self.max_loops}")
        if not 1 <= self.min_loops <= self.max_loops:
            raise ConfigError(f"infer.min_loops must lie in [1, infer.max_loops], got {self.min_loops}")
        if self.max_new_tokens < 0 or self.temperature < 0 or self.repetition_penalty <= 0:
            raise ConfigError(
                "infer.max_new_tokens and infer.temperature must be ≥ 0, repetition_penalty > 0"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"infer.top_k must be ≥ 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"infer.top_p must lie in (0, 1], got {self.top_p}")
