"""One optimizer step, shared by the LM trainer and task training: forward and backward over micro-batches,
gradient clipping, a finiteness check before the optimizer step, the model's constraints; and the stop
request that SIGINT/SIGTERM turn into a checkpoint at the next step boundary."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from looped.config import TrainConfig
from looped.distributed import Dist, all_reduce_sum
from looped.train.optim import Optimizers
from looped.train.sampler import step_seed

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_KEEP_BELOW = 1 << 30  # 1 GiB: blocks below it come from the heap, and freed heap below it stays


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel; True if set.

    A CPU training step allocates and frees the same large activations (16 MiB for one MLP hidden state in
    bench/train_throughput.py's setting) every step. By default glibc serves blocks above its mmap
    threshold (at most 32 MiB) with fresh mmaps and trims freed heap memory back to the kernel, so each
    step faults its activations in again, page by page: 28k–140k page faults and 0.06–0.3 s of system
    time in a 5 s step there (1 thread), and a 16 MiB elementwise product takes 3–7 ms instead of ~1.5. With
    both thresholds raised, freed blocks are reused and a warm step faults almost nothing (measured:
    0–7k faults, 0.007 s). Freed memory stays mapped, so the resident size stays at the step's peak
    (+3 % there, from heap fragmentation). A no-op off glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


def _forward_loss(model: nn.Module, x: Any, y: torch.Tensor, loops: Any, k: int):
    """One micro-batch forward; a module-level function so tests can inject faults."""
    return model(x, labels=y, loops=loops, backprop_loops=k)


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a tuple or list of them (a two-stream model's inputs and loop counts), on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def uses_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """train.precision: bf16 autocast when asked for, or by default on a GPU (bf16 matmuls are slow on most
    CPUs, so auto keeps fp32 there)."""
    return tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float  # mean training loss over the global batch (every rank's micro-batches)
    grad_norm: float  # before clipping
    output: Any = None  # the last micro-batch's model output (logits, state norms)

    @property
    def finite(self) -> bool:
        """False when the loss or the gradient is NaN or infinite: the step was skipped."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class Stepper:
    """Runs optimizer steps: micro-batches forward and backward (each seeded by its global index, so that
    initial-state noise does not depend on the rank or on a resume), clip, check finiteness, step, constrain.

    Args:
        net: what runs forward: the model, or its DDP wrapper / FSDP2-sharded self under torchrun.
        model: the model itself, whose `constrain_` runs after each step.
        opts: the optimizers.
        d: the process group position (its device is where batches go).
        seed: the run seed.
        accum: micro-batches per rank per step.
        clip: the gradient-norm bound (math.inf: measured, not clipped).
        bf16: run forward passes under bf16 autocast.
        defer_sync: DDP: all-reduce gradients only after the last micro-batch.
    """

    net: nn.Module
    model: nn.Module
    opts: Optimizers
    d: Dist
    seed: int
    accum: int = 1
    clip: float = math.inf
    bf16: bool = False
    defer_sync: bool = False
    params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        if self.d.device.type == "cpu":
            keep_freed_memory()  # activations are reused step after step instead of faulted in anew

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context forward passes (training and evaluation) run in."""
        if self.bf16:
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, step: int, micro_batches: Iterable[tuple[Any, torch.Tensor, Any]], k: int) -> StepResult:
        """One optimizer step over this rank's `micro_batches` of (inputs, labels, loop counts), `k` of the
        loops carrying gradients. A non-finite loss or gradient skips the update (the caller counts it)."""
        loss_sum, output = self._forward_backward(step, micro_batches, k)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        loss = float(all_reduce_sum(loss_sum, self.d)) / self.d.world
        result = StepResult(loss=loss, grad_norm=float(grad_norm), output=output)
        if result.finite:
            self.opts.step()
            self.model.constrain_()
        self.opts.zero_grad()
        return result

    def _forward_backward(
        self, step: int, micro_batches: Iterable[tuple[Any, torch.Tensor, Any]], k: int
    ) -> tuple[torch.Tensor, Any]:
        """Accumulate gradients of the mean loss over the micro-batches; returns (that loss, last output)."""
        device = self.d.device
        loss_sum = torch.zeros((), device=device)
        out = None
        for i, (x, y, loops) in enumerate(micro_batches):
            g = self.d.rank * self.accum + i  # the global micro-batch index fixes this micro's noise
            torch.manual_seed(step_seed(self.seed, step, 1 + g))
            sync = contextlib.nullcontext()
            if self.defer_sync and i < self.accum - 1:
                sync = self.net.no_sync()
            with sync:
                with self.autocast():
                    out = _forward_loss(
                        self.net, to_device(x, device), to_device(y, device), to_device(loops, device), k
                    )
                (out.loss / self.accum).backward()
            loss_sum += out.loss.detach() / self.accum
        return loss_sum, out


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary; a
    second one stops at once (KeyboardInterrupt). The previous handlers come back on exit.

    A repeat within `GRACE_S` of the first counts as the same request: a scheduler that signals every
    process by pid reaches a sweep worker twice (directly, and forwarded by its parent), and that must not
    throw away the steps since the last checkpoint."""

    GRACE_S = 2.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and time.monotonic() - self._first > self.GRACE_S:  # a second signal: stop now
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, time.monotonic()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
