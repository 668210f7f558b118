"""A vLLM model plugin: checkpoints exported by `looped export hf` (native or converted) served by vLLM.

Install `looped[vllm]` into the environment that has vLLM; its `vllm.general_plugins` entry point calls
`register`, which tells vLLM that the `LoopedForCausalLM` architecture is `LoopedVLLMModel`. The model runs
`LoopedLM` itself — the same forward pieces as training, `looped.Engine` and the transformers export —
and hands every attention layer one of vLLM's `Attention` layers (its paged KV cache and kernels) as a
`looped.model.kv.LayerAttention`. vLLM calls the model with the tokens of all its running sequences
flattened into one row and their positions; its attention metadata keeps the sequences apart.

The KV cache follows the checkpoint's `kv_cache` (the export's config.json, or
`--hf-overrides '{"kv_cache": ...}'`):
- `per-loop`: one vLLM attention layer, so one cache, per (loop, core layer): exactly the plain model, and
  memory per token of (prelude + coda + loops × core) layers;
- `shared`: one per core layer, written again by every loop, so each position keeps its last loop's
  entry (the `shared` rule of `looped.infer.cache`): memory per token of (prelude + coda + core) layers,
  whatever the loop count.
vLLM's block manager sizes every attention layer alike, so those layer counts are what its KV-cache
budget is divided by.

The loop count is fixed per deployment: `num_loops` of the export's config.json, or
`--hf-overrides '{"num_loops": T}'` (the cache is laid out for that count). Per-request loop counts and
per-token adaptive exit need the model's forward to know which request each token belongs to, which
vLLM's model interface does not pass (docs/serving.md says what is missing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from looped.config import ModelConfig
from looped.model.lm import LoopedLM

ARCHITECTURE = "LoopedForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point: register the architecture and the transformers config."""
    from vllm import ModelRegistry

    import looped.interop.hf  # noqa: F401  (registers model_type "looped" with transformers' AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "looped.interop.vllm:LoopedVLLMModel")


class _Attend:
    """One vLLM attention layer as a `LayerAttention`: (B, S, H, hd) in, (B, S, H·hd) out."""

    __slots__ = ("attn",)

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, S = q.shape[:2]
        y = self.attn(q.reshape(B * S, -1), k.reshape(B * S, -1), v.reshape(B * S, -1))
        return y.view(B, S, -1)


class _Layers:
    """The `KVProvider` of the vLLM model: a vLLM attention layer for each place in the model."""

    def __init__(self, layers: nn.ModuleList, index: dict[tuple[str, int, int], int]) -> None:
        self.attend = [_Attend(layer) for layer in layers]
        self.index = index

    def layer(self, part: str, layer: int, loop: int = 0) -> _Attend:
        return self.attend[self.index[(part, layer, loop if part == "core" else 0)]]

    def subset(self, index: torch.Tensor) -> _Layers:
        raise NotImplementedError("vLLM runs every row of a step at the same loop count")


def model_config(hf_config: Any) -> ModelConfig:
    """The native ModelConfig an exported config.json describes (its fields are ModelConfig's own)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: getattr(hf_config, k) for k in names if hasattr(hf_config, k)})


class LoopedVLLMModel(nn.Module):
    """`LoopedLM` under vLLM: its forward pieces with vLLM's paged attention; tensor parallel size 1."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        hf = vllm_config.model_config.hf_config
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("the looped vLLM model runs at tensor_parallel_size 1 (see docs/serving.md)")
        cfg = model_config(hf)
        if not cfg.causal or cfg.attn_window is not None or cfg.layout != "sequence":
            raise ValueError("vLLM serves causal models with full attention (model.causal, no attn_window)")
        self.loops = int(getattr(hf, "num_loops", None) or cfg.loops)
        self.per_loop = getattr(hf, "kv_cache", "per-loop") == "per-loop"
        self.model = LoopedLM(cfg)
        hd, kv_heads = cfg.resolved_head_dim, cfg.resolved_n_kv_heads
        # vLLM names each cache by a layer index (one integer per name): number the attention calls in
        # order, prelude, then core (per loop, or once when shared), then coda.
        places = [("prelude", i, 0) for i in range(cfg.prelude_layers)]
        core_loops = self.loops if self.per_loop else 1
        places += (
            [("core", i, t) for t in range(core_loops) for i in range(cfg.core_layers)] if cfg.looped else []
        )
        places += [("coda", i, 0) for i in range(cfg.coda_layers)]
        self.index = {place: n for n, place in enumerate(places)}
        if cfg.looped and not self.per_loop:  # shared: every loop of a core layer uses its one cache
            for t in range(1, self.loops):
                self.index.update(
                    {("core", i, t): self.index[("core", i, 0)] for i in range(cfg.core_layers)}
                )
        base = f"{prefix}.attn" if prefix else "attn"
        self.attn = nn.ModuleList(
            Attention(
                cfg.n_heads,
                hd,
                hd**-0.5,
                num_kv_heads=kv_heads,
                cache_config=vllm_config.cache_config,
                prefix=f"{base}.{n}",
            )
            for n in range(len(places))
        )
        self.kv = _Layers(self.attn, self.index)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.model.embed_inputs(input_ids[None], packed=True)
        return x[0]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The hidden states (T, D) before the final norm and head, for vLLM's T flattened tokens."""
        model = self.model
        if inputs_embeds is not None:
            x, ves = inputs_embeds[None], {}
        else:
            x, ves = model.embed_inputs(input_ids[None], packed=True)
        pos = positions[None]
        rope = model.rotary(x.shape[1], pos)
        kv = self.kv
        x = model.run_prelude(x, rope, ves, kv)
        if model.cfg.looped:
            inputs = model.loop_inputs(x, rope, ves)
            h = model.initial_state(inputs.e, pos).to(inputs.e.dtype)
            for t in range(self.loops):
                h = model.loop_step(h, inputs, kv, t)
            x = h
        return model.run_coda(x, rope, ves, kv)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The export's weights (LoopedLM's own names under `model.`); the tied head comes with the embedding."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"{name}: not a weight of this looped model")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {list(tensor.shape)}, the model has {list(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
        if self.model.cfg.tie_embeddings:
            loaded.add("model.head.weight")
        return loaded
