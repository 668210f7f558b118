"""The looped transformer: layers, blocks, injections, the model and its accounting."""

from looped.model.accounting import (
    baseline,
    flops_per_token,
    kv_cache_bytes_per_token,
    param_counts,
    unrolled_params,
)
from looped.model.lm import LoopedLM, LoopedOutput, StabilityReport

__all__ = [
    "LoopedLM",
    "LoopedOutput",
    "StabilityReport",
    "baseline",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "param_counts",
    "unrolled_params",
]
