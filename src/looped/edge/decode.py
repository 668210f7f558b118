"""Token-by-token generation on the device: the cached graphs, a KV cache of numpy arrays (`per-loop` or
`shared`, the rules of `looped.infer.cache`), adaptive exit, sampling and a per-token latency budget.

Each token costs 2 + T graph calls: the prelude, T core steps, the coda. The graphs take the cached keys
and values of their layers as inputs and return only the new token's, which are written here into
preallocated arrays; a cache slice [:, :start] of a batch-1 array is contiguous, so nothing is copied to
pass it in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from looped.edge.exit import log_softmax, parse_exit
from looped.errors import EdgeError


@dataclass
class Piece:
    """One generated token: its id, the text it adds (empty while a multi-byte character is incomplete),
    and the loops and milliseconds of the step that chose it (for the first token, the prompt's step)."""

    token: int
    text: str
    loops: int
    ms: float


class Graphs(Protocol):
    """What generation needs of a model (`looped.edge.EdgeModel`): its manifest, a way to run a named graph
    on named arrays, its tokenizer, default loop count and context."""

    manifest: dict
    tokenizer: Any
    default_loops: int
    max_seq_len: int

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def export_tokenizer(path: Path, manifest: dict) -> Any:
    """The export's tokenizer, or None when it was written without one (then prompts are token ids)."""
    if not manifest.get("tokenizer"):
        return None
    from looped.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


class Cache:
    """Keys and values of one sequence: (1, max_seq_len, kv_heads, head_dim) float32 per layer and group.

    Core layers keep one group (`shared`: written by each position's last loop) or one group per loop
    (`per-loop`: a position that ran u loops is copied into the groups of later loops, so a later token at
    loop t reads its loop min(t, u) entry, Huginn's "latest" rule)."""

    def __init__(self, manifest: dict, mode: str) -> None:
        if mode not in ("shared", "per-loop"):
            raise EdgeError(f"kv_cache must be shared or per-loop, got {mode!r}")
        self.mode = mode
        self.shape = (1, manifest["max_seq_len"], manifest["kv_heads"], manifest["head_dim"])
        layers = manifest["layers"]
        self.prelude = [self._new() for _ in range(layers["prelude"])]
        self.coda = [self._new() for _ in range(layers["coda"])]
        self.core_layers = layers["core"]
        self.core: list[list[list[np.ndarray]]] = []  # [group][layer] = [K, V]
        if mode == "shared":
            self.core.append([self._new() for _ in range(self.core_layers)])
        self.length = 0

    def _new(self) -> list[np.ndarray]:
        return [np.zeros(self.shape, dtype=np.float32), np.zeros(self.shape, dtype=np.float32)]

    def group(self, loop: int) -> list[list[np.ndarray]]:
        """The core group loop `loop` (from 0) reads and writes; per-loop groups start as copies of the newest."""
        if self.mode == "shared":
            return self.core[0]
        while len(self.core) <= loop:
            self.core.append(
                [[x.copy() for x in kv] for kv in self.core[-1]]
                if self.core
                else [self._new() for _ in range(self.core_layers)]
            )
        return self.core[loop]

    def feeds(self, part: str, layers: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
        n = self.length
        out = {}
        for i, (k, v) in enumerate(layers):
            out[f"past_key_{part}_{i}"], out[f"past_value_{part}_{i}"] = k[:, :n], v[:, :n]
        return out

    def write(self, part: str, layers: list[list[np.ndarray]], outputs: dict[str, np.ndarray]) -> None:
        n = self.length
        for i, (k, v) in enumerate(layers):
            new_k, new_v = outputs[f"key_{part}_{i}"], outputs[f"value_{part}_{i}"]
            k[:, n : n + new_k.shape[1]] = new_k
            v[:, n : n + new_v.shape[1]] = new_v

    def fill_later_loops(self, used: int, count: int) -> None:
        """Per-loop: the `count` positions just written ran `used` loops; later groups get their last entry."""
        n = self.length
        for t in range(used, len(self.core) if self.mode == "per-loop" else 0):
            for (k, v), (src_k, src_v) in zip(self.core[t], self.core[used - 1], strict=True):
                k[:, n : n + count] = src_k[:, n : n + count]
                v[:, n : n + count] = src_v[:, n : n + count]


class Timing:
    """Running estimates of one decode step's fixed part (prelude + coda) and of one core step, in ms, from
    which a latency budget picks the loop count; measured on this device as it decodes."""

    def __init__(self) -> None:
        self.fixed_ms: float | None = None
        self.step_ms: float | None = None

    def update(self, fixed_ms: float, step_ms: float, weight: float = 0.3) -> None:
        if self.fixed_ms is None:
            self.fixed_ms, self.step_ms = fixed_ms, step_ms
        else:
            self.fixed_ms += weight * (fixed_ms - self.fixed_ms)
            self.step_ms += weight * (step_ms - self.step_ms)

    def loops_for(self, budget_ms: float, most: int) -> int:
        return max(1, min(most, int((budget_ms - self.fixed_ms) / max(self.step_ms, 1e-6))))


class Generation:
    """One generation: options fixed, `stream(prompt)` yields `Piece`s.

    Args:
        model: The EdgeModel.
        loops: Loops per token (the most, with `exit`); None: the export's default.
        max_new_tokens: Tokens to generate at most; generation also ends at the end-of-text token.
        temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
        top_k, top_p: Sample among the k most likely tokens / the smallest set with probability ≥ p.
            (These three, when None, are the checkpoint's [infer] values the export recorded.)
        seed: The sampler's seed.
        exit: An exit criterion (`state:1e-2`, `kl:1e-3`, `entropy:1e-2`, `argmax:2`, `gate:0.5`).
        min_loops: No token exits before this many loops.
        kv_cache: `shared` or `per-loop`; None: the export's.
        budget_ms: A target in ms per generated token: each token runs as many loops as the measured step
            times allow within it (at most `loops`, or the export's most with no `loops` given).
    """

    def __init__(
        self,
        model: Graphs,
        loops: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        exit: str | None = None,
        min_loops: int = 1,
        kv_cache: str | None = None,
        budget_ms: float | None = None,
    ) -> None:
        m = model.manifest
        self.model = model
        most = int(m["loops"]["max"])
        self.loops = loops or (most if budget_ms is not None else model.default_loops)
        if not 1 <= self.loops <= most:
            raise EdgeError(f"loops must lie in [1, {most}] (the export's most), got {self.loops}")
        sampling = m.get("sampling", {})  # the checkpoint's [infer] defaults, as the export recorded them
        max_new_tokens = sampling.get("max_new_tokens", 64) if max_new_tokens is None else max_new_tokens
        temperature = sampling.get("temperature", 0.0) if temperature is None else temperature
        if temperature > 0:
            top_k = sampling.get("top_k") if top_k is None else top_k
            top_p = sampling.get("top_p") if top_p is None else top_p
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise EdgeError("temperature must be ≥ 0, top_k ≥ 1 and top_p in (0, 1]")
        if budget_ms is not None and budget_ms <= 0:
            raise EdgeError(f"budget_ms must be > 0, got {budget_ms}")
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = (
            max_new_tokens,
            temperature,
            top_k,
            top_p,
        )
        self.rng = np.random.default_rng(seed)
        self.exit = parse_exit(exit, bool(m["exit"]["gate"]))
        self.min_loops, self.budget_ms = min_loops, budget_ms
        self.cache = Cache(m, kv_cache or m["kv_cache"])
        self.timing = Timing()

    # ------------------------------------------------------------------ one call
    def step(self, ids: list[int], loops: int) -> tuple[np.ndarray, int, float, float]:
        """Append `ids` at the cache's end: (next-token logits (V,), loops run, ms of prelude + coda,
        ms per core step). Exit applies to single tokens."""
        m, cache = self.model, self.cache
        P = len(ids)
        start = np.array(cache.length, dtype=np.int64)
        t0 = time.perf_counter()
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "start": start}
        out = m.run("prelude_cached", {**feeds, **cache.feeds("prelude", cache.prelude)})
        cache.write("prelude", cache.prelude, out)
        feeds.update(out)
        t1 = time.perf_counter()
        exit = self.exit if P == 1 else None
        coda = None
        used = loops
        if exit is not None:
            exit.reset()
        for t in range(loops):
            group = cache.group(t)
            step = m.run("core_step_cached", {**feeds, **cache.feeds("core", group)})
            cache.write("core", group, step)
            feeds["state"] = step["next_state"]
            if exit is None:
                continue
            logprobs = None
            if exit.needs_logits:
                coda = m.run("coda_cached", {**feeds, **cache.feeds("coda", cache.coda)})
                logprobs = log_softmax(coda["logits"][0])
            gate = float(step["gate"][0, -1]) if exit.needs_gate else None
            if (
                exit.done(step["next_state"][0, -1], logprobs, gate)
                and t + 1 >= self.min_loops
                and t + 1 < loops
            ):
                used = t + 1
                break
        cache.fill_later_loops(used, P)
        t2 = time.perf_counter()
        if coda is None:
            coda = m.run("coda_cached", {**feeds, **cache.feeds("coda", cache.coda)})
        cache.write("coda", cache.coda, coda)
        cache.length += P
        t3 = time.perf_counter()
        return coda["logits"][0], used, 1e3 * (t1 - t0 + t3 - t2), 1e3 * (t2 - t1) / max(used, 1)

    # ------------------------------------------------------------------ sampling
    def pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        z = logits.astype(np.float64) / self.temperature
        if self.top_k is not None and self.top_k < z.size:
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p)
            drop = np.cumsum(p[order]) - p[order] >= self.top_p
            p[order[drop]] = 0
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))

    # ------------------------------------------------------------------ the stream
    def stream(self, prompt: str | list[int]) -> Iterator[Piece]:
        tok = self.model.tokenizer
        if isinstance(prompt, str) and tok is None:
            raise EdgeError("this export has no tokenizer: give the prompt as token ids")
        ids = tok.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise EdgeError("the prompt is empty")
        if len(ids) + self.max_new_tokens > self.model.max_seq_len:
            raise EdgeError(
                f"{len(ids)} prompt tokens + {self.max_new_tokens} new exceed the export's "
                f"max_seq_len = {self.model.max_seq_len}"
            )
        if self.budget_ms is not None and self.timing.fixed_ms is None:  # a first estimate, then forgotten
            _, _, fixed_ms, step_ms = self.step(ids[:1], 1)
            self.timing.update(fixed_ms, step_ms)
            self.cache = Cache(self.model.manifest, self.cache.mode)
        first = self.loops if self.budget_ms is None else self.timing.loops_for(self.budget_ms, self.loops)
        t0 = time.perf_counter()
        logits, used, *_ = self.step(ids, first)
        ms = 1e3 * (time.perf_counter() - t0)
        eot, pending = (tok.eot_id if tok is not None else None), []
        for i in range(self.max_new_tokens):
            token = self.pick(logits)
            if token == eot:
                return
            # Decode only the tokens not shown yet; a multi-byte character still incomplete waits for the rest.
            pending.append(token)
            fresh = tok.decode(pending) if tok is not None else ""
            if fresh.endswith("\ufffd"):
                fresh = ""
            else:
                pending = []
            yield Piece(token, fresh, used, ms)  # the loops and time of the step that chose it
            if i + 1 == self.max_new_tokens:  # the last token needs no step after it
                return
            loops = self.loops
            if self.budget_ms is not None:
                loops = self.timing.loops_for(self.budget_ms, self.loops)
            t0 = time.perf_counter()
            logits, used, fixed_ms, step_ms = self.step([token], loops)
            ms = 1e3 * (time.perf_counter() - t0)
            self.timing.update(fixed_ms, step_ms)
