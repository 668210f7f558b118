"""Exact accounting from the config alone: parameters, FLOPs per token, KV-cache bytes, and matched baselines.

Conventions (those of `torch.utils.flop_counter.FlopCounterMode`, which the tests check against):
a matmul of (m×k)·(k×n) is 2mkn FLOPs; attention is counted dense, 4·S·n_heads·head_dim per token and
layer for scores and values (causal masking is not discounted); norms, softmax and elementwise ops are
not counted. Backward costs twice the forward of everything that carries gradients; loops run without
gradients (before the last `backprop_loops`) cost their forward only. On CPU, FlopCounterMode counts
nothing for the flash-attention kernel: compare under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import torch

from looped.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from torch import nn

PARTS = ("embedding", "value_embeds", "prelude", "injection", "core", "readout", "coda", "head")


def block_params(cfg: ModelConfig, value_embed: bool) -> int:
    d, hd = cfg.width, cfg.resolved_head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.resolved_n_kv_heads * hd * 2
    gate = cfg.value_gate_channels * cfg.resolved_n_kv_heads if value_embed else 0
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.resolved_mlp_hidden
    qk_bias = 2 * cfg.n_heads * hd if cfg.qk_bias else 0
    return attn + gate + mlp + qk_bias + _block_norm_params(cfg)


def _block_norm_params(cfg: ModelConfig) -> int:
    return (2 if cfg.block_norm == "pre-norm" else 4) * cfg.width


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters by part, computed from the config (no model is built); keys PARTS + 'total'."""
    d, V = cfg.width, cfg.vocab_size
    ve = set(cfg.ve_layers)
    p, c = cfg.prelude_layers, cfg.core_layers

    def blocks(first: int, n: int) -> int:
        return sum(block_params(cfg, first + i in ve) for i in range(n))

    injection = 0
    if cfg.looped:
        injection = {"diagonal": d * d + 2 * d, "linear": 2 * d * d, "additive": 0, "none": 0}[cfg.injection]
        injection += d if cfg.injection_bias else 0
    counts = {
        "embedding": V * d,
        "value_embeds": len(ve) * V * cfg.resolved_n_kv_heads * cfg.resolved_head_dim,
        "prelude": blocks(0, p) + (d if cfg.looped and cfg.prelude_norm else 0),
        "injection": injection,
        "core": blocks(p, c),
        "readout": (d * d if cfg.looped and cfg.readout else 0) + (d + 1 if cfg.exit_gate else 0),
        "coda": blocks(p + c, cfg.coda_layers),
        "head": d + (0 if cfg.tie_embeddings else V * d),  # final norm (+ untied head matrix)
    }
    counts["total"] = sum(counts.values())
    return counts


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Unique parameters of a built model by part (tied weights counted once, under embedding)."""
    prefix = {
        "embed": "embedding",
        "value_embeds": "value_embeds",
        "prelude": "prelude",
        "prelude_norm": "prelude",
        "injection": "injection",
        "core": "core",
        "readout": "readout",
        "exit_gate": "readout",  # a readout of the state, too: the exit probability
        "coda": "coda",
        "final_norm": "head",
        "head": "head",
    }
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        counts[prefix[name.split(".")[0]]] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def unrolled_params(cfg: ModelConfig, loops: int) -> int:
    """Parameters of the equivalent unrolled network (core counted once per loop): Parcae's N(μ)."""
    counts = param_counts(cfg)
    return counts["total"] + (loops - 1) * counts["core"]


def _block_flops(cfg: ModelConfig, value_embed: bool, seq_len: int) -> int:
    qk_bias = 2 * cfg.n_heads * cfg.resolved_head_dim if cfg.qk_bias else 0
    matrices = block_params(cfg, value_embed) - _block_norm_params(cfg) - qk_bias
    return 2 * matrices + 4 * seq_len * cfg.n_heads * cfg.resolved_head_dim


def flops_parts(cfg: ModelConfig, loops: int, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token: once (outside the loop) and per loop."""
    d, ve = cfg.width, set(cfg.ve_layers)
    p, c = cfg.prelude_layers, cfg.core_layers
    once = sum(_block_flops(cfg, i in ve, seq_len) for i in range(p))
    once += sum(_block_flops(cfg, p + c + i in ve, seq_len) for i in range(cfg.coda_layers))
    once += 2 * d * cfg.vocab_size
    per_loop = 0
    if cfg.looped:
        per_loop = sum(_block_flops(cfg, p + i in ve, seq_len) for i in range(c))
        # The injection's input term B·e (or W_e·e) is loop-invariant and computed once.
        if cfg.injection in ("diagonal", "linear"):
            once += 2 * d * d
        if cfg.injection == "linear":
            per_loop += 2 * d * d
        if cfg.readout:
            once += 2 * d * d
        if cfg.exit_gate:  # the gate reads the state after every loop
            per_loop += 2 * d
    return {"once": once, "per_loop": per_loop}


def flops_per_token(
    cfg: ModelConfig, loops: int, seq_len: int, training: bool = False, backprop_loops: int | None = None
) -> float:
    """FLOPs per token of one forward pass (or forward + backward when `training`).

    With `training`, loops before the last `backprop_loops` (None: all loops carry gradients) are
    forward-only and counted once; everything else costs 3× its forward.
    """
    if loops < 1:
        raise ValueError(f"loops must be ≥ 1, got {loops}")
    parts = flops_parts(cfg, loops, seq_len)
    n_loops = loops if cfg.looped else 0
    forward = parts["once"] + n_loops * parts["per_loop"]
    if not training:
        return float(forward)
    k = n_loops if backprop_loops is None else max(0, min(backprop_loops, n_loops))
    return float(3 * forward - 2 * (n_loops - k) * parts["per_loop"])


def kv_cache_bytes_per_token(
    cfg: ModelConfig, loops: int, dtype: torch.dtype = torch.bfloat16, shared: bool = False
) -> int:
    """KV-cache bytes per token: one key and one value vector per attention call that is cached.

    `per-loop` caching keeps an entry per (loop, core layer); `shared` keeps one per core layer, so the
    figure does not grow with loops.
    """
    per_layer = (
        2 * cfg.resolved_n_kv_heads * cfg.resolved_head_dim * torch.empty((), dtype=dtype).element_size()
    )
    core_entries = cfg.core_layers * (1 if shared or not cfg.looped else loops)
    return per_layer * (cfg.prelude_layers + cfg.coda_layers + core_entries)


def standard_config(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    """A plain transformer with n_layers distinct blocks and otherwise the same settings as cfg."""
    return dataclasses.replace(
        cfg,
        prelude_layers=n_layers,
        core_layers=0,
        coda_layers=0,
        value_embeds=bool(cfg.ve_layers),
        value_embed_layers=None,
        spectral_norm=[],
        loops=1,
    )


def baseline(
    cfg: ModelConfig,
    match: Literal["params", "flops"] = "params",
    loops: int | None = None,
    seq_len: int | None = None,
) -> ModelConfig:
    """The config of a standard (non-looped) transformer matched to a looped one.

    `params`: the layer count whose unique parameters come closest to the looped model's.
    `flops`: the layer count whose forward FLOPs per token come closest to the looped model's at `loops`
    (default `cfg.loops`) and `seq_len` (default `cfg.max_seq_len`): distinct layers instead of loops.
    Then the MLP hidden width is adjusted (to a multiple of 8) so the metric matches closely, usually
    within 1 %: whole layers alone leave a gap of the injection and readout. Width, heads, MLP kind,
    vocabulary and every other setting stay the same.
    """
    if match not in ("params", "flops"):
        raise ConfigError(f"baseline match = {match!r} is not one of 'params', 'flops'")
    loops = loops or cfg.loops
    seq_len = seq_len or cfg.max_seq_len
    if match == "params":
        target = param_counts(cfg)["total"]

        def metric(n: int) -> float:
            return param_counts(standard_config(cfg, n))["total"]
    else:
        target = flops_per_token(cfg, loops, seq_len)

        def metric(n: int) -> float:
            return flops_per_token(standard_config(cfg, n), 1, seq_len)

    upper = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * max(loops, 1) + 2
    best = min(range(1, upper + 1), key=lambda n: (abs(metric(n) - target), n))
    base = standard_config(cfg, best)
    # Whole layers leave a gap (the injection and readout are a fraction of a block): close it with the MLP
    # hidden width, to a multiple of 8, since both metrics are linear in it.
    measure = (
        (lambda c: param_counts(c)["total"])
        if match == "params"
        else (lambda c: flops_per_token(c, 1, seq_len))
    )
    h0 = base.resolved_mlp_hidden
    slope = (measure(dataclasses.replace(base, mlp_hidden=h0 + 64)) - measure(base)) / 64
    if slope > 0:
        hidden = max(8, 8 * round((h0 + (target - measure(base)) / slope) / 8))
        tuned = dataclasses.replace(base, mlp_hidden=hidden)
        if abs(measure(tuned) - target) < abs(measure(base) - target):
            return tuned
    return base
