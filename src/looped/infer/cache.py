"""KV caches for looped models: `per-loop` (one entry per (loop, core layer), memory ∝ loops) or `shared`
(one entry per core layer, written by the last loop each position ran; memory does not depend on loops).

Layout: every group of keys/values is a (rows, n_kv_heads, slots, head_dim) tensor. A row is one sequence; its
tokens sit at slots 0, 1, ... in order, so sequences of different lengths share a batch without padding
tricks, and rows can be taken and released while others keep decoding (the server's continuous batching).

What an attention layer sees at loop t (the rules the engine's tests check against recomputation):
- prelude and coda layers: the entries of all earlier positions, one per position, as in any transformer;
- core layers, `per-loop`: position j's entry from loop min(t, T_j), T_j being the loops position j ran
  (Huginn's "latest" fallback when j exited early), so a fixed loop count equals the uncached model exactly;
- core layers, `shared`: position j's entry from its last loop T_j, whatever t is. Tokens written in one call
  (a prompt) see each other at the current loop, as they are computed in parallel.
"""

from __future__ import annotations

from typing import Literal

import torch

from looped.config import ModelConfig

# Below this many key elements per row (keys × query heads × head_dim), torch's CPU attention kernel costs
# less than `SingleQueryLayer`'s ten small ops; above it, its cost grows ~2.5× faster. In a whole bf16 decode
# step of a width-512 model (8 heads of 64, one Zen 4 core) the two break even near 64 keys; SingleQueryLayer
# saves 4 % of the step at 200 keys and 17 % at 500.
SINGLE_QUERY_MIN_ELEMENTS = 32768

KVMode = Literal["per-loop", "shared"]
KV_MODES = ("per-loop", "shared")


class KVCache:
    """Keys and values of every attention layer for up to `rows` sequences; grows in rows, slots and loops."""

    def __init__(
        self,
        cfg: ModelConfig,
        mode: KVMode = "shared",
        rows: int = 1,
        slots: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in KV_MODES:
            raise ValueError(f"unknown kv_cache mode {mode!r}; choose one of {', '.join(KV_MODES)}")
        self.cfg, self.mode = cfg, mode
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.rows, self.slots = max(1, rows), max(1, min(slots, cfg.max_seq_len))
        self.lengths = torch.zeros(self.rows, dtype=torch.long)  # tokens stored per row (kept on CPU)
        self.in_use = [False] * self.rows
        self.loop_groups = 0  # core groups allocated per layer (per-loop mode)
        self.groups: dict[tuple, list[torch.Tensor]] = {}
        for i in range(cfg.prelude_layers):
            self.groups[("prelude", i)] = self._new()
        for i in range(cfg.coda_layers):
            self.groups[("coda", i)] = self._new()
        if cfg.looped and mode == "shared":
            for i in range(cfg.core_layers):
                self.groups[("core", i, 0)] = self._new()

    # ------------------------------------------------------------------ storage
    def _new(self) -> list[torch.Tensor]:
        shape = (self.rows, self.cfg.resolved_n_kv_heads, self.slots, self.cfg.resolved_head_dim)
        return [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2)]

    def _resize(self, rows: int, slots: int) -> None:
        old_rows, old_slots = self.rows, self.slots
        self.rows, self.slots = rows, slots
        for key, kv in self.groups.items():
            new = self._new()
            for a, b in zip(new, kv, strict=True):
                a[:old_rows, :, :old_slots] = b
            self.groups[key] = new
        if rows > old_rows:
            self.lengths = torch.cat([self.lengths, torch.zeros(rows - old_rows, dtype=torch.long)])
            self.in_use += [False] * (rows - old_rows)

    def reserve(self, slots: int) -> None:
        """Make room for `slots` positions per row (doubling, capped at max_seq_len)."""
        if slots > self.cfg.max_seq_len:
            raise ValueError(f"{slots} positions exceed the model's context of {self.cfg.max_seq_len} tokens")
        if slots > self.slots:
            self._resize(self.rows, min(self.cfg.max_seq_len, max(slots, 2 * self.slots)))

    def ensure_loops(self, loops: int) -> None:
        """Per-loop mode: have groups for loops 1..`loops`; a new group starts as a copy of the newest one,
        which is what every position's latest loop was (the min(t, T_j) rule)."""
        if self.mode != "per-loop" or not self.cfg.looped:
            return
        for t in range(self.loop_groups, loops):
            for i in range(self.cfg.core_layers):
                if t == 0:
                    self.groups[("core", i, t)] = self._new()
                else:
                    self.groups[("core", i, t)] = [x.clone() for x in self.groups[("core", i, t - 1)]]
        self.loop_groups = max(self.loop_groups, loops)

    def group(self, kind: str, layer: int, loop: int = 0) -> list[torch.Tensor]:
        if kind == "core":
            return self.groups[("core", layer, loop if self.mode == "per-loop" else 0)]
        return self.groups[(kind, layer)]

    # ------------------------------------------------------------------ rows
    def allocate(self) -> int:
        """Take a free row (growing the cache when all are taken); its length starts at 0."""
        free = [r for r, used in enumerate(self.in_use) if not used]
        if free:
            r = free[0]
        else:
            r = self.rows
            self._resize(2 * self.rows, self.slots)
        self.in_use[r] = True
        self.lengths[r] = 0
        return r

    def release(self, row: int) -> None:
        self.in_use[row] = False
        self.lengths[row] = 0

    def reset(self) -> None:
        """Forget every row; per-loop groups are dropped too, so one deep request does not leave later ones
        copying entries into loops they never run (and the memory is given back). A new lengths tensor, not
        an in-place zero: the Engine's steps run under inference mode, and this may be called outside it."""
        self.lengths = torch.zeros_like(self.lengths)
        self.in_use = [False] * self.rows
        if self.mode == "per-loop":
            for key in [k for k in self.groups if k[0] == "core"]:
                del self.groups[key]
            self.loop_groups = 0

    # ------------------------------------------------------------------ copying loops forward
    def fill_later_loops(self, rows: torch.Tensor, slots: torch.Tensor, used: torch.Tensor) -> None:
        """Per-loop mode: positions (rows[b], slots[b, :]) ran `used[b]` loops; copy their last entry into the
        groups of later loops, so a later token at loop t > used[b] reads it (the min(t, T_j) rule)."""
        if self.mode != "per-loop" or not self.cfg.looped:
            return
        for u in sorted(set(used.tolist())):
            if u >= self.loop_groups:
                continue
            sel = (used == u).nonzero().squeeze(1)
            r, s = rows[sel][:, None], slots[sel]
            for i in range(self.cfg.core_layers):
                src = self.groups[("core", i, u - 1)]
                for t in range(u, self.loop_groups):
                    dst = self.groups[("core", i, t)]
                    for a, b in zip(dst, src, strict=True):
                        a[r, :, s] = b[r, :, s]

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(x.numel() * x.element_size() for kv in self.groups.values() for x in kv)

    def used_bytes(self) -> int:
        """Bytes of the entries that hold tokens (tokens stored × groups × keys and values)."""
        tokens = int(self.lengths.sum())
        per_token = (
            2
            * self.cfg.resolved_n_kv_heads
            * self.cfg.resolved_head_dim
            * torch.empty((), dtype=self.dtype).element_size()
        )
        return tokens * per_token * len(self.groups)

    def view(
        self, rows: torch.Tensor, slots: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> CacheView:
        """Bind one forward call: rows (B,), the slots its tokens are written to (B, P), and optionally a
        (B, S) mask of keys that may be attended (False for padding)."""
        self.reserve(int(slots.max()) + 1)
        return CacheView(self, rows, slots, key_mask)


class CacheView:
    """One forward call's window onto the cache: which rows, which slots are written, what is visible."""

    def __init__(
        self, cache: KVCache, rows: torch.Tensor, slots: torch.Tensor, key_mask: torch.Tensor | None
    ) -> None:
        self.cache, self.rows, self.slots = cache, rows, slots
        self.span = int(slots.max()) + 1  # keys 0..span-1 are read
        B = rows.shape[0]
        # Rows 0..B-1 in order (one request, or a full batch) read the cache through views, without copying.
        self.contiguous = bool(torch.equal(rows.cpu(), torch.arange(B)))
        # The common cases need no mask tensor (SDPA is much faster without one on CPU): a fresh prompt
        # batch is plain causal, and a decode step where every row has the same length sees every key.
        self.causal, self.mask = False, None
        P = slots.shape[1]
        if key_mask is None and bool((slots[:, 0] == 0).all()):
            self.causal = P > 1
        elif key_mask is not None or P > 1 or bool((slots[:, 0] != self.span - 1).any()):
            key_pos = torch.arange(self.span, device=slots.device)
            visible = key_pos[None, None, :] <= slots[:, :, None]  # (B, P, S): causal over slots
            if key_mask is not None:
                # A padding query still sees its own key: a row with nothing visible gives NaN on some
                # backends, and NaN times a zero weight would reach the real tokens.
                own = key_pos[None, None, :] == slots[:, :, None]
                visible = visible & (key_mask[:, None, : self.span].to(torch.bool) | own)
            self.mask = visible[:, None].to(cache.device)  # (B, 1, P, S)
        same = bool((slots == slots[:1]).all())
        self.block = (int(slots[0, 0]), int(slots[0, -1]) + 1) if self.contiguous and same else None
        self._r = rows.to(cache.device)[:, None]
        self._s = slots.to(cache.device)
        self._layers: dict[int, CacheLayer] = {}
        self._f32: torch.Tensor | None = None  # float32 keys and values for SingleQueryLayer

    def subset(self, index: torch.Tensor) -> CacheView:
        """The same call restricted to batch entries `index` (rows still running the loop)."""
        view = object.__new__(CacheView)
        view.cache, view.rows, view.slots = self.cache, self.rows[index], self.slots[index]
        view.span, view.causal = self.span, self.causal
        view.contiguous, view.block = False, None
        view.mask = None if self.mask is None else self.mask[index]
        view._r, view._s = self._r[index], self._s[index]
        view._layers, view._f32 = {}, None
        return view

    def layer(self, part: str, layer: int, loop: int = 0) -> CacheLayer:
        """The cache of one attention layer for this call (satisfies `looped.model.kv.KVProvider`). Made
        once per group and call: a shared core layer hands every loop the same object, whose slices of the
        cache are then taken once per token rather than once per loop."""
        kv = self.cache.group(part, layer, loop)
        found = self._layers.get(id(kv))  # the CacheLayer holds kv, so its id is not reused meanwhile
        if found is None:
            kind = SingleQueryLayer if self._single_query() else CacheLayer
            found = self._layers[id(kv)] = kind(self, kv)
        return found

    def upcast(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys and values (B, n_kv, S, hd) in float32, in two buffers that every layer of this call reuses
        (layers run one after another): a fresh 100+ KiB tensor per layer would come from mmap each time,
        page faults included, and cost more than the attention itself."""
        if self._f32 is None or self._f32.shape != (2, *keys.shape):
            self._f32 = torch.empty((2, *keys.shape), dtype=torch.float32, device=keys.device)
        self._f32[0].copy_(keys)
        self._f32[1].copy_(values)
        return self._f32[0], self._f32[1]

    def _single_query(self) -> bool:
        """A decode step (one new token per row, each seeing all its keys) on a CPU cache in bf16/fp16 with
        enough keys: the call `SingleQueryLayer` attends faster than torch's CPU kernel does."""
        c = self.cache
        return (
            self.slots.shape[1] == 1
            and self.mask is None
            and c.device.type == "cpu"
            and c.dtype in (torch.bfloat16, torch.float16)
            and self.span * c.cfg.n_heads * c.cfg.resolved_head_dim >= SINGLE_QUERY_MIN_ELEMENTS
        )


class CacheLayer:
    """What an attention layer calls: store this call's keys and values, get back everything visible (the
    `looped.model.kv.LayerKV` protocol)."""

    __slots__ = ("view", "kv", "_dst", "_src")

    def __init__(self, view: CacheView, kv: list[torch.Tensor]) -> None:
        self.view, self.kv = view, kv
        K, V = kv
        n = view.rows.shape[0]
        # Views of the cache made once: where rows 0..B-1 write (when they all write the same slots) and
        # what they read (when they are rows 0..B-1).
        self._dst = (
            None if view.block is None else (K[:n, :, slice(*view.block)], V[:n, :, slice(*view.block)])
        )
        self._src = (K[:n, :, : view.span], V[:n, :, : view.span]) if view.contiguous else None

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """k, v: (B, P, n_kv_heads, head_dim) → keys, values (B, n_kv_heads, S, head_dim), the mask
        (B, 1, P, S) or None, and whether attention is plain causal instead."""
        view = self.view
        K, V = self.kv
        if self._dst is not None:  # rows 0..B-1 all writing the same slots: a plain copy
            self._dst[0].copy_(k.transpose(1, 2))
            self._dst[1].copy_(v.transpose(1, 2))
        else:
            K[view._r, :, view._s] = k.to(K.dtype)
            V[view._r, :, view._s] = v.to(V.dtype)
        if self._src is not None:
            return self._src[0], self._src[1], view.mask, view.causal
        r = view._r[:, 0]
        keys, values = K[:, :, : view.span].index_select(0, r), V[:, :, : view.span].index_select(0, r)
        return keys, values, view.mask, view.causal


class SingleQueryLayer(CacheLayer):
    """A CacheLayer that also attends (the `looped.model.kv.LayerAttention` protocol), for one query per row
    that sees every cached key: in float32, from the low-precision cache.

    Why: torch's CPU attention kernel (flash) is slow for a single bf16 query, about 85 µs per layer at 96
    keys and 8 heads of 64, 440 µs at 512, on a Zen 4 core, against 45 and 125 µs for two float32 matrix
    products over the upcast keys and values here. The result is the same attention (scale 1/√head_dim,
    grouped-query heads as SDPA's enable_gqa pairs them), accumulated in float32 as the flash kernel does,
    then rounded to the cache's dtype.
    """

    __slots__ = ()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, 1, H, hd), k and v (B, 1, n_kv, hd) after RoPE → attention output (B, 1, H·hd)."""
        keys, values = self.update(k, v)[:2]  # (B, n_kv, S, hd) each
        B, _, H, hd = q.shape
        n_kv = keys.shape[1]
        keys, values = self.view.upcast(keys, values)
        # Query head h reads key head h // (H / n_kv), as SDPA's enable_gqa pairs them.
        queries = q.reshape(B, n_kv, H // n_kv, hd).float().mul_(hd**-0.5)  # (B, n_kv, g, hd)
        scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, n_kv, g, S)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, n_kv, g, hd)
        return out.reshape(B, 1, H * hd).to(q.dtype)
