"""The interface a KV cache offers the model: the model runs with any object of this shape and imports no cache.

A forward pass with a cache hands each attention layer a `LayerKV` — "store these keys and values, give me
every key this query may see" — or a `LayerAttention`, which also attends (a paged cache whose kernel
knows the sequences), obtained from a `KVProvider` by the layer's place in the model. Which rows
of a batch a call writes, how loops share entries and how memory grows are the provider's business
(`looped.infer.cache` holds the caches the engine uses).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

Part = Literal["prelude", "core", "coda"]


class LayerKV(Protocol):
    """One attention layer's view of the cache for one call."""

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store k, v (B, P, kv_heads, dim_head); return keys and values (B, kv_heads, S, dim_head), a boolean
        mask (B, 1, P, S) of the keys each query sees or None, and whether attention is plain causal instead."""
        ...


class LayerAttention(Protocol):
    """An attention layer's cache and kernel in one, as an engine with a paged cache (vLLM) provides it: it
    stores this call's keys and values and attends, knowing itself which keys each query may see."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, S, H, hd), k and v (B, S, kv_heads, hd), after RoPE → the attention output (B, S, H·hd)."""
        ...


class KVProvider(Protocol):
    """Hands out the cache of each attention layer; `loop` counts from 0 and matters to core layers only."""

    def layer(self, part: Part, layer: int, loop: int = 0) -> LayerKV | LayerAttention: ...

    def subset(self, index: torch.Tensor) -> KVProvider:
        """The same call restricted to batch entries `index` (the rows still looping)."""
        ...
