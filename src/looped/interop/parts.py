"""The model as graphs with tensors in and out: prelude, one loop step and coda (uncached and KV-cached), and
the whole loop as one graph with its count as an input — what the ONNX and ExecuTorch exports trace.

Why three graphs and a loop in host code: the loop count, and when to stop a token early, stay choices of
the program that runs the model, made per call on the device; the host loop costs about nothing next to a
core step. Each graph calls the model's own pieces (`LoopedLM.run_prelude`, `loop_step`, `run_coda`), so
there is still one forward pass.

Graph inputs and outputs are named (`PartGraph.inputs`, `.outputs`):
- `input_ids` (B, S) int64; `state` (B, S, D) the recurrent state; `inject_j` the injection's terms in the
  prelude output, computed once and read by every loop (what they are depends on `model.injection`);
  `ve_L` the value embeddings of layer L (core and coda layers; the prelude's stay inside);
- `gate` (B, S) the exit gate's logit after the step (models with `model.exit_gate`);
- KV-cached graphs also take `start` (0-d int64, the position of the first new token, the same for the
  whole batch), and for each attention layer `past_key_<part>_<i>` / `past_value_<part>_<i>`
  (B, start, kv_heads, head_dim), and return only this call's `key_<part>_<i>` / `value_<part>_<i>`
  (B, S, kv_heads, head_dim): the caller appends them, so no graph copies a cache. Which past a core layer
  reads at which loop (`per-loop`, `shared`) is the caller's choice, as in `looped.infer.cache`; the cached
  coda returns the logits of the last position only, (B, V).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from looped.checkpoint import TOKENIZER, check_tokenizer, load, load_config_dir
from looped.config import Config, ModelConfig
from looped.data.tokenizer import Tokenizer
from looped.errors import ConfigError
from looped.infer.cache import KV_MODES
from looped.model import accounting
from looped.model.lm import LoopedLM, LoopInputs


@dataclass(frozen=True)
class Layout:
    """What flows between the graphs of one model: the injection's terms and the value-embedding layers."""

    inject: int  # how many injection terms (tensors) the prelude hands the loop
    inject_spec: pytree.TreeSpec | None  # None: the injection has no terms (injection = none)
    core_ves: tuple[int, ...]  # value-embedding layers read by the core
    coda_ves: tuple[int, ...]  # ... and by the coda

    @property
    def inject_names(self) -> list[str]:
        return [f"inject_{j}" for j in range(self.inject)]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and the quantizer's chatter (warnings, log lines, prints); errors still raise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@dataclass
class ExportSource:
    """A checkpoint opened for export: its config, the model in eval mode, its tokenizer (None without one:
    prompts are then token ids), and the export's KV-cache mode and longest sequence, checked."""

    cfg: Config
    model: LoopedLM
    tokenizer: Any
    kv_cache: str
    max_seq_len: int

    @classmethod
    def open(cls, checkpoint: Path, kv_cache: str | None, max_seq_len: int | None) -> ExportSource:
        cfg = load_config_dir(checkpoint)
        model = load(checkpoint).eval()
        check_exportable(model)
        tokenizer = None  # a converted checkpoint may have none: its export then takes token ids
        if (checkpoint / TOKENIZER).is_file():
            tokenizer = Tokenizer.load(checkpoint)
            check_tokenizer(checkpoint, tokenizer, cfg.model.vocab_size)
        kv_cache = kv_cache or cfg.infer.kv_cache
        if kv_cache not in KV_MODES:
            raise ConfigError(f"--kv-cache must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
        max_seq_len = max_seq_len or cfg.model.max_seq_len
        if not 8 <= max_seq_len <= cfg.model.max_seq_len:
            raise ConfigError(f"--max-seq-len must lie in [8, model.max_seq_len = {cfg.model.max_seq_len}]")
        # The eval-mode initial state is a table by position, drawn once; made before tracing, the graphs
        # hold it as a constant.
        model.initial_state(torch.zeros(1, 1, cfg.model.width))
        return cls(cfg, model, tokenizer, kv_cache, max_seq_len)

    def manifest(self) -> dict:
        """What a host program needs to run the graphs (an export's manifest.json, less its files): sizes of
        the caches, loop counts, exit and sampling defaults, FLOPs per token, the tokenizer."""
        cfg, m, tokenizer = self.cfg, self.cfg.model, self.tokenizer
        return {
            "dtype": "float32",
            "model": cfg.to_dict()["model"],
            "vocab_size": m.vocab_size,
            "width": m.width,
            "kv_heads": m.resolved_n_kv_heads,
            "head_dim": m.resolved_head_dim,
            "layers": {"prelude": m.prelude_layers, "core": m.core_layers, "coda": m.coda_layers},
            "max_seq_len": self.max_seq_len,
            "loops": {
                "default": m.loops,
                "mean_loops": cfg.loops.mean_loops,
                "max": cfg.infer.max_request_loops,
            },
            "exit": {"default": cfg.infer.exit, "min_loops": cfg.infer.min_loops, "gate": m.exit_gate},
            "kv_cache": self.kv_cache,
            "sampling": {
                "temperature": cfg.infer.temperature,
                "top_k": cfg.infer.top_k,
                "top_p": cfg.infer.top_p,
                "max_new_tokens": cfg.infer.max_new_tokens,
            },
            "flops": _flops_coefficients(m),
            "tokenizer": TOKENIZER if tokenizer is not None else None,
            "eot_id": tokenizer.eot_id if tokenizer is not None else None,
        }


def check_exportable(model: LoopedLM) -> None:
    """Refuse what the graphs do not cover, saying why, before any tracing."""
    cfg = model.cfg
    if not cfg.looped:
        raise ConfigError("export: the model has no core (model.core_layers = 0); nothing loops")
    if cfg.layout != "sequence":
        raise ConfigError(
            f"export: model.layout = {cfg.layout!r}; only token sequences export (layout sequence)"
        )
    if cfg.attn_window is not None:
        raise ConfigError("export: sliding-window attention (model.attn_window) is not exported yet")
    if not cfg.causal:
        raise ConfigError("export: a non-causal model is not a language model to decode; export needs causal")


def layout_of(model: LoopedLM) -> Layout:
    """Trace one tiny prelude eagerly to learn how many injection terms there are and how they nest."""
    e = torch.zeros(1, 2, model.cfg.width)
    leaves, spec = _flatten(model.injection.prepare(e))
    p, c = model.cfg.prelude_layers, model.cfg.core_layers
    layers = sorted(int(i) for i in model.value_embeds)
    return Layout(
        inject=len(leaves),
        inject_spec=spec,
        core_ves=tuple(i for i in layers if p <= i < p + c),
        coda_ves=tuple(i for i in layers if i >= p + c),
    )


def _flatten(u: Any) -> tuple[list[torch.Tensor], pytree.TreeSpec | None]:
    """The injection's terms as a flat list (torch's pytree counts None as a leaf; here it is no term)."""
    return ([], None) if u is None else pytree.tree_flatten(u)


def _unflatten(leaves: list[torch.Tensor], spec: pytree.TreeSpec | None) -> Any:
    return None if spec is None else pytree.tree_unflatten(leaves, spec)


def kv_names(model: LoopedLM, part: str) -> list[tuple[str, str]]:
    """(key, value) name stems of the attention layers a graph holds, e.g. ("key_core_0", "value_core_0")."""
    cfg = model.cfg
    n = {"prelude": cfg.prelude_layers, "core_step": cfg.core_layers, "coda": cfg.coda_layers}[part]
    kind = "core" if part == "core_step" else part
    return [(f"key_{kind}_{i}", f"value_{kind}_{i}") for i in range(n)]


class _GraphKV:
    """A `looped.model.kv.KVProvider` over past keys and values that are graph inputs; it keeps this call's new
    keys and values to return as outputs. Every loop of a step reads the same past (the caller picks it)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def layer(self, part: str, layer: int, loop: int = 0) -> _GraphLayerKV:
        return _GraphLayerKV(self, layer)

    def subset(self, index: torch.Tensor) -> _GraphKV:
        raise NotImplementedError("an exported graph runs every row of its batch")

    def outputs(self) -> list[torch.Tensor]:
        return [t for pair in self.new for t in pair]


class _GraphLayerKV:
    def __init__(self, owner: _GraphKV, index: int) -> None:
        self.owner, self.index = owner, index

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """k, v (B, S, kv_heads, hd) → keys, values (B, kv_heads, past + S, hd) and the causal mask over them."""
        past_k, past_v = self.owner.past[self.index]
        self.owner.new[self.index] = (k, v)
        keys = torch.cat([past_k.to(k.dtype), k], dim=1).transpose(1, 2)
        values = torch.cat([past_v.to(v.dtype), v], dim=1).transpose(1, 2)
        L, S = past_k.shape[1], k.shape[1]
        query_pos = torch.arange(S, device=k.device) + L
        key_pos = torch.arange(L + S, device=k.device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, S, L + S)
        return keys, values, mask, False


class PartGraph(nn.Module):
    """One exportable graph of a model; `inputs` and `outputs` name its tensors in order."""

    part = ""

    def __init__(self, model: LoopedLM, cached: bool = False) -> None:
        super().__init__()
        check_exportable(model)
        self.model, self.cached = model, cached
        self.layout = layout_of(model)
        self.kv = kv_names(model, self.part) if cached else []

    def _kv_inputs(self) -> list[str]:
        return [f"past_{name}" for pair in self.kv for name in pair]

    def _kv_outputs(self) -> list[str]:
        return [name for pair in self.kv for name in pair]

    def _named(self, tensors: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        if len(tensors) != len(self.inputs):
            raise ValueError(
                f"{self.part} takes {len(self.inputs)} tensors ({', '.join(self.inputs)}), got {len(tensors)}"
            )
        return dict(zip(self.inputs, tensors, strict=True))

    def _kv(self, x: dict[str, torch.Tensor]) -> _GraphKV | None:
        if not self.cached:
            return None
        return _GraphKV([(x[f"past_{k}"], x[f"past_{v}"]) for k, v in self.kv])

    def _positions(self, length: int, start: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, S) positions start..start+S-1 of a cached call; None uncached (0..S-1)."""
        if start is None:
            return None
        return (torch.arange(length, device=start.device) + start)[None].expand(batch, length)

    def _rope(self, length: int, start: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.model.rotary(length, self._positions(length, start, batch))


class PreludeGraph(PartGraph):
    """input_ids [, start, past K/V] → state (the initial state), inject_*, ve_* [, new K/V]."""

    part = "prelude"

    @property
    def inputs(self) -> list[str]:
        return ["input_ids"] + (["start", *self._kv_inputs()] if self.cached else [])

    @property
    def outputs(self) -> list[str]:
        ves = [f"ve_{i}" for i in self.layout.core_ves + self.layout.coda_ves]
        return ["state", *self.layout.inject_names, *ves, *self._kv_outputs()]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, x = self.model, self._named(tensors)
        input_ids, start = x["input_ids"], x.get("start")
        B, S = input_ids.shape
        emb, ves = model.embed_inputs(input_ids)
        positions = self._positions(S, start, B)
        rope = model.rotary(S, positions)
        kv = self._kv(x)
        inputs = model.loop_inputs(model.run_prelude(emb, rope, ves, kv), rope, ves)
        h = model.initial_state(inputs.e, positions)
        leaves = _flatten(inputs.u)[0]
        later = [ves[i] for i in self.layout.core_ves + self.layout.coda_ves]
        return (h, *leaves, *later, *(kv.outputs() if kv is not None else []))


class CoreStepGraph(PartGraph):
    """state, inject_*, ve_* (core) [, start, past K/V of the core layers] → next_state [, gate] [, new K/V]:
    one loop (ONNX wants output names distinct from input names)."""

    part = "core_step"

    @property
    def inputs(self) -> list[str]:
        ves = [f"ve_{i}" for i in self.layout.core_ves]
        cached = ["start", *self._kv_inputs()] if self.cached else []
        return ["state", *self.layout.inject_names, *ves, *cached]

    @property
    def outputs(self) -> list[str]:
        gate = ["gate"] if self.model.exit_gate is not None else []
        return ["next_state", *gate, *self._kv_outputs()]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, layout, x = self.model, self.layout, self._named(tensors)
        h, start, kv = x["state"], x.get("start"), self._kv(x)
        u = _unflatten([x[name] for name in layout.inject_names], layout.inject_spec)
        ves = {i: x[f"ve_{i}"] for i in layout.core_ves}
        rope = self._rope(h.shape[1], start, h.shape[0])
        h = model.loop_step(h, LoopInputs(e=None, u=u, rope=rope, ves=ves), kv)
        gate = [model.exit_logit(h)] if model.exit_gate is not None else []
        return (h, *gate, *(kv.outputs() if kv is not None else []))


class CodaGraph(PartGraph):
    """state, ve_* (coda) [, start, past K/V of the coda layers] → logits (B, S, V) uncached, or the last
    position's (B, V) cached [, new K/V]."""

    part = "coda"

    @property
    def inputs(self) -> list[str]:
        ves = [f"ve_{i}" for i in self.layout.coda_ves]
        return ["state", *ves, *(["start", *self._kv_inputs()] if self.cached else [])]

    @property
    def outputs(self) -> list[str]:
        return ["logits", *self._kv_outputs()]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, x = self.model, self._named(tensors)
        h, start, kv = x["state"], x.get("start"), self._kv(x)
        ves = {i: x[f"ve_{i}"] for i in self.layout.coda_ves}
        out = model.run_coda(h, self._rope(h.shape[1], start, h.shape[0]), ves, kv)
        if kv is None:
            return (model.logits(out),)
        return (model.logits(out[:, -1]), *kv.outputs())


class LoopGraph(nn.Module):
    """input_ids (B, S), loops (0-d int64) → logits (B, S, V): the whole model as one graph, its loop a
    `while_loop` (one ONNX `Loop` node) whose count is an input. Uncached; no exit."""

    inputs = ["input_ids", "loops"]
    outputs = ["logits"]

    def __init__(self, model: LoopedLM) -> None:
        super().__init__()
        self.prelude = PreludeGraph(model)
        self.core_step = CoreStepGraph(model)
        self.coda = CodaGraph(model)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.while_loop import while_loop

        input_ids, loops = tensors

        layout = self.prelude.layout
        h, *rest = self.prelude(input_ids)
        n = layout.inject + len(layout.core_ves)
        step_inputs, coda_ves = tuple(rest[:n]), tuple(rest[n:])

        def cond(i: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            return i < loops

        def body(i: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return i + 1, self.core_step(state, *step_inputs)[0]

        _, h = while_loop(cond, body, (torch.zeros_like(loops), h))
        return self.coda(h, *coda_ves)[0]


def dynamic_shapes(
    graph: torch.nn.Module, example: tuple[torch.Tensor, ...], max_seq_len: int, batch: bool = True
) -> dict:
    """Which axes of each input stay free: batch and sequence of every (B, S, ...) tensor, the cached length
    of every past key/value; a 0-d input (start, loops) and a per-channel term (the decay) are fixed.
    `batch` False fixes the batch axis at the example's (XNNPACK takes batch 1 only)."""
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    past = torch.export.Dim("past", min=0, max=max_seq_len - 1)
    shapes = []
    for name, x in zip(graph.inputs, example, strict=True):
        if name.startswith("past_"):
            shapes.append({0: batch_dim, 1: past} if batch else {1: past})
        elif x.ndim >= 2:
            shapes.append({0: batch_dim, 1: seq} if batch else {1: seq})
        else:
            shapes.append(None)
    return {"tensors": tuple(shapes)}


def example_inputs(model: LoopedLM, cached: bool, batch: int = 2) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example inputs of every graph, made by running the model's own pieces on random tokens: `batch` rows,
    by default 3 new tokens after 5 cached (sizes that export does not specialise on)."""
    cfg = model.cfg
    B, S, past = batch, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    prelude = PreludeGraph(model, cached)
    kv_shape = (B, past, cfg.resolved_n_kv_heads, cfg.resolved_head_dim)

    def pasts(graph: PartGraph) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(kv_shape) for _ in range(2 * len(graph.kv)))

    start = (torch.tensor(past),) if cached else ()
    with torch.no_grad():
        out = prelude(ids, *start, *pasts(prelude))
    layout = prelude.layout
    n = layout.inject + len(layout.core_ves)
    h, step_inputs = out[0], out[1 : 1 + n]
    coda_ves = out[1 + n : 1 + n + len(layout.coda_ves)]
    core, coda = CoreStepGraph(model, cached), CodaGraph(model, cached)
    return {
        "prelude": (ids, *start, *pasts(prelude)),
        "core_step": (h, *step_inputs, *start, *pasts(core)),
        "coda": (h, *coda_ves, *start, *pasts(coda)),
    }


def _flops_coefficients(m: ModelConfig) -> dict:
    """flops_per_token(T, s) = once[0] + once[1]·s + T·(per_loop[0] + per_loop[1]·s): the accounting's
    figure (linear in the context length s and in T) as four numbers the device can use without torch."""

    def line(value_at) -> list[float]:  # [v(0), slope] of a function linear in s, from s = 1 and 2
        slope = value_at(2) - value_at(1)
        return [value_at(1) - slope, slope]

    def per_loop(s: int) -> float:
        return accounting.flops_per_token(m, 2, s) - accounting.flops_per_token(m, 1, s)

    return {
        "once": line(lambda s: accounting.flops_per_token(m, 1, s) - per_loop(s)),
        "per_loop": line(per_loop),
    }
