"""Compute budgets: loops from a FLOP budget or a latency target, a measured latency profile (`looped calibrate`)
and a controller that follows the machine's load.

The profile fits decode milliseconds per step as a + c·T for each batch size measured. While generating, the
engine divides measured step times by the profile's prediction; the running ratio (how much busier the
machine is now than when it was calibrated) scales every prediction, so a request asking for 20 ms per token
gets fewer loops while another job loads the machine and more once it stops.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from looped.model.lm import LoopedLM

PROFILE = "calibration.json"


@dataclass
class Profile:
    """Decode latency per step against loops, per batch size: ms ≈ fit[b][0] + fit[b][1]·T, measured with the
    model on `device` ("cpu", "cuda") in `dtype` ("float32", "bfloat16"); it predicts nothing elsewhere."""

    fit: dict[int, tuple[float, float]]
    measured: dict[int, dict[int, float]] = field(default_factory=dict)  # batch → {loops: ms}
    machine: dict = field(default_factory=dict)
    device: str | None = None  # None: not recorded (a profile written before looped recorded it)
    dtype: str | None = None
    # Self-speculative decoding (`calibrate_speculation`): {"acceptance": {loops: {draft loops: rate}},
    # "verify_ratio": {tokens: ms of one verify pass over them / ms of one decode step}}; None: not measured.
    speculative: dict | None = None

    def mismatch(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this profile does not describe a model on `device` in `dtype`, or None when it does. A profile
        that does not say where it was measured describes nothing."""
        device_here, dtype_here = device.type, str(dtype).removeprefix("torch.")
        if self.device is None or self.dtype is None:
            return "it does not say which device and dtype it was measured on"
        if (self.device, self.dtype) != (device_here, dtype_here):
            return f"measured on {self.device} in {self.dtype}, not on {device_here} in {dtype_here}"
        return None

    def predict(self, batch: int, loops: float) -> float:
        """Milliseconds for one decode step of `batch` sequences at `loops` loops (nearest batch size measured,
        scaled linearly beyond the largest)."""
        sizes = sorted(self.fit)
        below = [b for b in sizes if b <= batch]
        b = below[-1] if below else sizes[0]
        a, c = self.fit[b]
        ms = a + c * loops
        return ms * batch / b if batch > sizes[-1] else ms

    def to_dict(self) -> dict:
        return {
            "fit": {str(b): list(v) for b, v in self.fit.items()},
            "measured": {str(b): {str(t): ms for t, ms in m.items()} for b, m in self.measured.items()},
            "machine": self.machine,
            "device": self.device,
            "dtype": self.dtype,
            "speculative": self.speculative,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        return cls(
            fit={int(b): (float(v[0]), float(v[1])) for b, v in d["fit"].items()},
            measured={
                int(b): {int(t): float(ms) for t, ms in m.items()} for b, m in d.get("measured", {}).items()
            },
            machine=d.get("machine", {}),
            device=d.get("device"),
            dtype=d.get("dtype"),
            speculative=d.get("speculative"),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile | None:
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a calibration profile ({e}); rerun `looped calibrate`") from None


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - c * mx, c


@torch.no_grad()
def calibrate(
    model: LoopedLM,
    loops: list[int] = (1, 2, 4, 8, 16),
    batch_sizes: list[int] = (1,),
    tokens: int = 16,
    prompt_len: int = 32,
    kv_cache: str = "shared",
    repeats: int = 3,
    progress: bool = False,
) -> Profile:
    """Time decode steps at each (batch size, loops): the median of `repeats` runs of `tokens` steps after a
    prompt of `prompt_len` tokens; fit ms = a + c·T per batch size."""
    from tqdm import tqdm

    from looped.infer.cache import KVCache
    from looped.infer.forward import forward_cached

    model.eval()
    weight = next(model.parameters())
    device = weight.device
    prompt_len = max(1, min(prompt_len, model.cfg.max_seq_len - tokens - 1))
    gen = torch.Generator().manual_seed(0)
    measured: dict[int, dict[int, float]] = {}
    todo = [(b, t) for b in batch_sizes for t in loops]
    bar = tqdm(todo, desc="calibrate", disable=not progress, unit="setting")
    for b, t in bar:
        ids = torch.randint(0, model.cfg.vocab_size, (b, prompt_len + tokens), generator=gen).to(device)
        runs = []
        for _ in range(repeats):
            slots = prompt_len + tokens
            cache = KVCache(model.cfg, kv_cache, rows=b, slots=slots, device=device, dtype=weight.dtype)
            forward_cached(model, cache, ids[:, :prompt_len], loops=t)
            start = time.perf_counter()
            for s in range(tokens):
                forward_cached(model, cache, ids[:, prompt_len + s : prompt_len + s + 1], loops=t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - start) * 1000 / tokens)
        measured.setdefault(b, {})[t] = sorted(runs)[len(runs) // 2]
        bar.set_postfix(batch=b, loops=t, ms=f"{measured[b][t]:.2f}")
    fit = {b: _linear_fit(list(m), list(m.values())) for b, m in measured.items()}
    dtype = str(weight.dtype).removeprefix("torch.")
    return Profile(fit=fit, measured=measured, machine=machine_info(), device=device.type, dtype=dtype)


@torch.no_grad()
def calibrate_speculation(
    model: LoopedLM,
    loops: list[int],
    kv_cache: str = "per-loop",
    tokens: int = 48,
    prompts: int = 2,
    verify_sizes: tuple[int, ...] = (1, 2, 3, 5, 9),
    repeats: int = 3,
) -> dict:
    """What self-speculative decoding needs to pick its pair (`looped.infer.speculative.choose`):
    - acceptance: for each T in `loops` (above 1), the model's own greedy continuation of `prompts` random
      prompts at T loops, read again at every draft depth D < T (1, 2, 4, …) in one pass: the share of
      positions where D loops pick the same token as T (the rate at which greedy drafts are kept);
    - verify_ratio: ms of one cached pass over n tokens at the largest T, over ms of one decode step there,
      for n in `verify_sizes` (medians of `repeats`)."""
    from looped.infer.cache import KVCache
    from looped.infer.forward import forward_cached

    model.eval()
    weight = next(model.parameters())
    device = weight.device
    prompt_len = max(1, min(16, model.cfg.max_seq_len - tokens - max(verify_sizes) - 1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (prompts, prompt_len), generator=gen).to(device)
    acceptance: dict[int, dict[int, float]] = {}
    for t in [t for t in loops if t > 1]:
        cache = KVCache(
            model.cfg, kv_cache, rows=prompts, slots=prompt_len + tokens, device=device, dtype=weight.dtype
        )
        seq = ids
        nxt = forward_cached(model, cache, seq, loops=t).logits.argmax(-1)
        for _ in range(tokens - 1):
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            nxt = forward_cached(model, cache, nxt[:, None], loops=t).logits.argmax(-1)
        target = torch.cat([seq, nxt[:, None]], dim=1)[:, prompt_len:]  # T's greedy tokens
        depths = sorted({d for d in (1, 2, 4, 8, 16, 32) if d < t} | {t - 1})
        acceptance[t] = {}
        for d in depths:
            guess = model(seq, loops=d).logits[:, prompt_len - 1 :].argmax(-1)
            acceptance[t][d] = float((guess == target).float().mean())
    top = max(loops)
    ms: dict[int, float] = {}
    for n in verify_sizes:
        chunk = torch.randint(0, model.cfg.vocab_size, (1, n), generator=gen).to(device)
        runs = []
        for _ in range(repeats):
            cache = KVCache(
                model.cfg, kv_cache, rows=1, slots=prompt_len + n, device=device, dtype=weight.dtype
            )
            forward_cached(model, cache, ids[:1], loops=top)
            start = time.perf_counter()
            forward_cached(model, cache, chunk, loops=top, all_logits=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        ms[n] = sorted(runs)[len(runs) // 2]
    return {"acceptance": acceptance, "verify_ratio": {n: ms[n] / ms[1] for n in verify_sizes}}


class LatencyController:
    """Picks loops for a latency target from the profile, corrected by how slow the machine is right now."""

    def __init__(self, profile: Profile, smoothing: float = 0.5) -> None:
        self.profile = profile
        self.smoothing = smoothing
        self.slowdown = 1.0  # measured / predicted, smoothed

    def pick(self, target_ms: float, batch: int, cap: int) -> int:
        """The most loops in [1, cap] whose predicted step time fits `target_ms` (1 if none does)."""
        best = 1
        for t in range(1, cap + 1):
            if self.slowdown * self.profile.predict(batch, t) <= target_ms:
                best = t
            else:
                break
        return best

    def observe(self, batch: int, loops: float, ms: float) -> None:
        """Fold in one measured step of `batch` sequences that ran `loops` loops on average."""
        predicted = self.profile.predict(batch, loops)
        if predicted <= 0 or ms <= 0:
            return
        ratio = ms / predicted
        self.slowdown = (1 - self.smoothing) * self.slowdown + self.smoothing * ratio


def loops_for_flops(model: LoopedLM, max_flops: float, seq_len: int, cap: int) -> int:
    """The most loops in [1, cap] whose forward FLOPs per token fit `max_flops`."""
    best = 0
    for t in range(1, cap + 1):
        if model.flops_per_token(t, seq_len) <= max_flops:
            best = t
        else:
            break
    if best == 0:
        need = model.flops_per_token(1, seq_len)
        raise ValueError(
            f"max_flops_per_token = {max_flops:.4g} is below the cost of one loop ({need:.4g} FLOPs per token)"
        )
    return best
