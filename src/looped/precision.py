"""The faster of bfloat16 and float32 on a device (for decoding and for Muon's orthogonalisation): bfloat16 where
the hardware multiplies it natively, float32 elsewhere.

A batch-1 decode step is a chain of matrix-vector products, mostly bound by the bytes of weights read from
memory, which bfloat16 halves; a batched step is bound by the multiplies, which native bf16 instructions
(AVX-512 BF16, AMX) do about twice as fast as float32. Without those instructions torch emulates bf16 and
it runs slower than float32. So `fastest_dtype` asks the CPU's flags, then confirms with a timing probe of
a few tens of milliseconds (run once per process) that bf16 multiplies faster here, since a torch build
whose kernels do not use the instructions gains nothing from the flags. On CUDA, bf16 wherever torch
supports it.
"""

from __future__ import annotations

import functools
import time

import torch

# CPU feature flags (as /proc/cpuinfo and torch's cpuinfo name them) that give native bf16 dot products.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# In the probe (a compute-bound product), native bf16 runs about 2.2× as fast as float32 (AVX-512 BF16, Zen 4)
# and emulated bf16 slower than float32; below this ratio the flags are not believed.
MIN_PROBE_SPEEDUP = 1.2


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: torch's own detection where this torch exposes it, else /proc/cpuinfo's."""
    try:
        capability = torch._C._cpu._get_cpu_capability()  # private: a dict of flag → bool (torch ≥ 2.3)
        return frozenset(name for name, on in capability.items() if on is True)
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
        return frozenset(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (any of `BF16_FLAGS` among `flags`, default this CPU's)."""
    return any(f in (cpu_flags() if flags is None else flags) for f in BF16_FLAGS)


def _chain_seconds(weights: list[torch.Tensor], x: torch.Tensor, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        h = x
        for w in weights:
            h = torch.nn.functional.linear(h, w)
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def bf16_probe_speedup() -> float:
    """fp32 time ÷ bf16 time of 16 rows through two 1024 × 1024 matrices on this CPU, best of a few
    alternating rounds; measured once per process (30 ms on one Zen 4 core).

    Sixteen rows, not one: a single row's product is bound by reading the weights, which bf16 halves
    whether or not the CPU multiplies it natively (and with the weights in cache, torch's one-row bf16
    kernel is no faster than float32's); sixteen rows are bound by the multiply, which is what the flags
    promise and what batched decoding, prompts and the bf16 KV reads need."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1024, 1024, generator=gen) / 32 for _ in range(2)]
    x = torch.randn(16, 1024, generator=gen)
    low = [w.to(torch.bfloat16) for w in weights]
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        fp32 = bf16 = float("inf")
        for _ in range(3):  # alternate, so that a burst of load elsewhere hits both alike
            fp32 = min(fp32, _chain_seconds(weights, x, 2))
            bf16 = min(bf16, _chain_seconds(low, xb, 2))
    return fp32 / bf16


def fastest_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype `infer.dtype = "auto"` decodes in on `device`: bfloat16 on a CUDA device that supports it
    and on a CPU with native bf16 that the probe confirms; float32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu" or not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16 if bf16_probe_speedup() >= MIN_PROBE_SPEEDUP else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch.dtype for "float32", "bfloat16" or "auto" (the fastest `device` computes in:
    `fastest_dtype`); a torch.dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fastest_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]
