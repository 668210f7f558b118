"""The run-time config sections: infer (generation defaults) and serve (the HTTP server)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from looped.config.section import ConfigError, Section, doc


@dataclass
class InferConfig(Section):
    """Defaults for generation (`looped generate`, `looped chat`, the Engine); each request may override them."""

    _section: typing.ClassVar[str] = "infer"

    kv_cache: Literal["per-loop", "shared"] = doc(
        "shared", "KV cache for core layers: shared (one entry per position) or per-loop (one per loop)."
    )
    max_request_loops: int = doc(64, "The most loops a request may ask for; more is an error.")
    exit: str = doc(
        "none",
        "Adaptive exit: none, or criterion:threshold (kl:1e-3, entropy:1e-2, state:1e-2, argmax:2, and gate:0.5 "
        "for models with an exit gate).",
    )
    min_loops: int = doc(1, "With adaptive exit, no token stops before this many loops.")
    warm_start: bool = doc(False, "Start each token's loop from the previous token's final state.")
    max_new_tokens: int = doc(128, "Tokens to generate per request unless it says otherwise.")
    temperature: float = doc(0.8, "Sampling temperature; 0 is greedy.")
    top_k: int | None = doc(50, "Sample among the k most likely tokens; None keeps all.")
    top_p: float | None = doc(None, "Nucleus sampling: the smallest set of tokens with probability ≥ p.")
    repetition_penalty: float = doc(1.0, "Divide logits of tokens already in the text (CTRL); 1 is off.")
    device: Literal["auto", "cpu", "cuda"] = doc(
        "auto", "Where inference runs (generate, chat, eval, calibrate, serve): auto picks CUDA when present."
    )
    dtype: Literal["float32", "bfloat16", "auto"] = doc(
        "float32",
        "Weights and activations at inference; bfloat16 halves memory and, on a GPU or a CPU with AVX-512 BF16 "
        "or AMX, speeds decoding; auto picks bfloat16 where the device has it (looped.precision).",
    )

    def validate(self) -> None:
        if self.max_request_loops < 1:
            raise ConfigError(f"infer.max_request_loops must be ≥ 1, got {self.max_request_loops}")
        if not 1 <= self.min_loops <= self.max_request_loops:
            raise ConfigError(
                f"infer.min_loops must lie in [1, infer.max_request_loops], got {self.min_loops}"
            )
        if self.max_new_tokens < 0 or self.temperature < 0 or self.repetition_penalty <= 0:
            raise ConfigError(
                "infer.max_new_tokens and infer.temperature must be ≥ 0, repetition_penalty > 0"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"infer.top_k must be ≥ 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"infer.top_p must lie in (0, 1], got {self.top_p}")


TIER_KEYS = {"loops", "exit", "min_loops", "max_ms_per_token", "max_flops_per_token", "speculative"}
KEY_KEYS = {"name", "sha256", "tiers", "loop_cap", "rate_per_minute"}


@dataclass
class ServeConfig(Section):
    """`looped serve`: the HTTP server's address, limits, compute tiers and API keys."""

    _section: typing.ClassVar[str] = "serve"

    host: str = doc("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = doc(8000, "TCP port.")
    model_name: str | None = doc(
        None, "The model id clients name; None means the checkpoint directory's name."
    )
    max_batch: int = doc(16, "The most requests decoded together; more wait in the queue.")
    queue_size: int = doc(64, "The most requests waiting for a batch slot; beyond it requests get 429.")
    max_body_bytes: int = doc(1_000_000, "Largest request body accepted; larger ones get 413.")
    request_timeout_s: float = doc(120.0, "A request not finished after this long is stopped (504).")
    max_tokens: int = doc(512, "The most tokens one request may ask to generate.")
    default_max_tokens: int = doc(
        16, "Tokens generated when a request gives no max_tokens (OpenAI's default)."
    )
    default_tier: str | None = doc(
        None, "Tier of requests that name no loops, budget or tier; None: the model's loops."
    )
    tiers: dict[str, dict[str, Any]] = doc(
        {"fast": {"loops": 1}, "balanced": {"loops": 4, "exit": "kl:1e-3"}, "best": {"loops": 16}},
        "Named compute tiers a request picks with `compute`: each sets loops, exit, min_loops or a budget, "
        'and optionally speculative ("D:K" or "auto").',
    )
    keys: list[dict[str, Any]] = doc(
        [],
        "API keys; empty means no key is needed. Each: name, sha256 (of the key; `looped serve --hash-key`), "
        "and optionally tiers (allowed), loop_cap and rate_per_minute.",
    )

    def validate(self) -> None:
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be ≥ 1, got {getattr(self, name)}")
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigError(f"serve.port must lie in [1, 65535] (or 0: any free port), got {self.port}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"serve.request_timeout_s must be > 0, got {self.request_timeout_s}")
        for tier, spec in self.tiers.items():
            unknown = set(spec) - TIER_KEYS
            if unknown:
                raise ConfigError(
                    f"serve.tiers.{tier}: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(TIER_KEYS))}"
                )
        if self.default_tier is not None and self.default_tier not in self.tiers:
            raise ConfigError(f"serve.default_tier = {self.default_tier!r} is not one of serve.tiers")
        names = set()
        for i, key in enumerate(self.keys):
            where = f"serve.keys[{i}]"
            unknown = set(key) - KEY_KEYS
            if unknown:
                raise ConfigError(
                    f"{where}: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(KEY_KEYS))}"
                )
            digest = key.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
                raise ConfigError(
                    f"{where}.sha256 must be 64 lowercase hex digits (`looped serve --hash-key < key.txt`)"
                )
            if not isinstance(key.get("name"), str) or key["name"] in names:
                raise ConfigError(f"{where}.name must be a string, different for every key")
            names.add(key["name"])
            for tier in key.get("tiers", []):
                if tier not in self.tiers:
                    raise ConfigError(f"{where}.tiers: {tier!r} is not one of serve.tiers")
            for limit in ("loop_cap", "rate_per_minute"):
                v = key.get(limit)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ConfigError(f"{where}.{limit} must be an integer ≥ 1, got {v!r}")
