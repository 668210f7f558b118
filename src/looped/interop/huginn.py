"""Huginn-0125 and the retrofitted-recurrence Llamas (`model_type: huginn_raven`) as LoopedLM configurations.

Both come from Huginn's code (seal-rg/recurrent-pretraining; McLeish et al. 2025 regroup a Llama's layers
into it) and share its layout: `transformer.{wte, prelude, adapter, core_block, coda, ln_f}` and
`lm_head`, blocks with a fused `attn.Wqkv` [q; k; v] and `mlp.fc` [gate; up] (SiLU), and the adapter
`Linear(2E → E)` on [state, e] (state first: our `linear` injection, whose W acts on [h; e]). They differ in:

| | Huginn-0125 | retrofitted Llama |
|---|---|---|
| block | sandwich-residual: norm_2(x + attn(norm_1 x)), norm_4(x + mlp(norm_3 x)) | Llama pre-norm (norm_1, norm_2) |
| RoPE | interleaved pairs, `rope_base`, stored `freqs_cis` | rotate half, `rope_theta`, Llama-3 `rope_scaling` |
| q, k | `qk_bias` (2, 1, H, hd) added before RoPE | no bias; GQA |
| embedding | × √width | × `init_values.embed_scale` |
| final norm | `ln_f` on the state after the loop and on the coda output | on the coda output only |

Both write the same `model_type` (and even `block_class_name`), so `is_huginn` tells them apart by the
weights: only Huginn has `norm_3`/`norm_4` and `freqs_cis`. The initial state is zero (their reference
forward with `init_scale = 0`; the released default draws noise, which is not what a deterministic
runtime wants).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from looped.config import ConfigError, ModelConfig
from looped.errors import ConversionError
from looped.interop.hub import Plan, SourceDir, config_getter, expect_shape
from looped.model.layers import rope_table

STACKS = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
LAYER_KEYS = {
    "n_layers_in_prelude": "prelude",
    "n_layers_in_recurrent_block": "core_block",
    "n_layers_in_coda": "coda",
}


def is_raven(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "huginn_raven"


def is_huginn(src: SourceDir) -> bool:
    """Huginn-0125 itself (sandwich blocks), not a retrofitted Llama: the weights decide, not the config."""
    return "freqs_cis" in src.keys() or any(".norm_3." in k for k in src.keys())


def model_config(src: SourceDir) -> ModelConfig:
    """Our config for a huginn_raven folder; what we cannot represent raises ConversionError naming the key."""
    c, huginn = src.config, is_huginn(src)
    get = config_getter(c)
    if get("injection_type", "linear") != "linear":
        raise ConversionError(
            f"config.json: injection_type {get('injection_type')!r} is not supported (linear)"
        )
    if get("nonlin_name", "SiLU") != "SiLU" or get("mlp_class_name", "GatedMLP") != "GatedMLP":
        raise ConversionError(
            "config.json: mlp_class_name / nonlin_name: only GatedMLP with SiLU is supported"
        )
    width, heads = get("n_embd", required=True), get("n_heads", required=True)
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or width // heads
    layers = {ours: get(key, required=True) for key, ours in LAYER_KEYS.items()}
    fields: dict[str, Any] = dict(
        vocab_size=get("padded_vocab_size") or get("vocab_size", required=True),
        width=width,
        n_heads=heads,
        n_kv_heads=kv_heads if kv_heads != heads else None,
        head_dim=head_dim if head_dim != width // heads else None,
        mlp="swiglu",
        mlp_hidden=get("intermediate_size", required=True),
        norm_eps=float(get("norm_eps", 1e-6)),
        qk_norm=False,
        qk_bias=bool(get("qk_bias", False)),
        tie_embeddings=bool(get("tie_embeddings", False)),
        prelude_layers=layers["prelude"],
        core_layers=layers["core_block"],
        coda_layers=layers["coda"],
        loops=max(1, int(get("mean_recurrence") or 32)),
        injection="linear",
        injection_bias=bool(get("bias", False)),
        prelude_norm=False,
        readout=False,
        state_init="zero",
    )
    if huginn:
        fields.update(
            block_norm="sandwich-residual",
            rope_base=float(get("rope_base", 50000.0)),
            rope_pairing="interleaved",
            embed_scale=math.sqrt(width),  # the code computes it from n_embd, whatever init_values says
            final_norm="state-and-head",
            max_seq_len=get("block_size", required=True),
        )
    else:
        fields.update(
            block_norm="pre-norm",
            rope_base=float(get("rope_theta", required=True)),  # rope_base is written but never read
            rope_pairing="half",
            embed_scale=float((get("init_values") or {}).get("embed_scale", 1.0)),
            final_norm="head",
            max_seq_len=get("max_position_embeddings") or get("block_size", required=True),
            **_rope_scaling(get("rope_scaling")),
        )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConversionError(f"config.json: {e}") from None


def _rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any]:
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConversionError(f"config.json: rope_scaling type {kind!r} is not supported (llama3)")
    return dict(
        rope_scale_kind="llama3",
        rope_scale_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_max_len=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def plan(src: SourceDir) -> Plan:
    """Our weights from theirs (Wqkv and fc split, norms renamed by block layout); checks every shape."""
    cfg = model_config(src)
    huginn = is_huginn(src)
    out = Plan(cfg)
    d, hd = cfg.width, cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd, cfg.resolved_n_kv_heads * hd
    expect_shape(src, "transformer.wte.weight", (cfg.vocab_size, d))
    out.copy("embed.weight", "transformer.wte.weight", src)
    norms = (
        {"norm_1": "attn_norm", "norm_2": "attn_out_norm", "norm_3": "mlp_norm", "norm_4": "mlp_out_norm"}
        if huginn
        else {"norm_1": "attn_norm", "norm_2": "mlp_norm"}
    )
    for theirs, ours in STACKS.items():
        for i in range(getattr(cfg, f"{ours}_layers")):
            a, b = f"transformer.{theirs}.{i}", f"{ours}.{i}"
            for n, m in norms.items():
                expect_shape(src, f"{a}.{n}.weight", (d,))
                out.copy(f"{b}.{m}.weight", f"{a}.{n}.weight", src)
            expect_shape(src, f"{a}.attn.Wqkv.weight", (q + 2 * kv, d))
            out.split(
                [f"{b}.attn.wq.weight", f"{b}.attn.wk.weight", f"{b}.attn.wv.weight"],
                f"{a}.attn.Wqkv.weight",
                [q, kv, kv],
                src,
            )
            if cfg.qk_bias:
                expect_shape(src, f"{a}.attn.qk_bias", (2, 1, cfg.n_heads, hd))
                out.copy(f"{b}.attn.qk_bias", f"{a}.attn.qk_bias", src)
            expect_shape(src, f"{a}.attn.proj.weight", (d, q))
            out.copy(f"{b}.attn.wo.weight", f"{a}.attn.proj.weight", src)
            h = cfg.resolved_mlp_hidden
            expect_shape(src, f"{a}.mlp.fc.weight", (2 * h, d))
            out.split([f"{b}.mlp.w_gate.weight", f"{b}.mlp.w_in.weight"], f"{a}.mlp.fc.weight", [h, h], src)
            expect_shape(src, f"{a}.mlp.proj.weight", (d, h))
            out.copy(f"{b}.mlp.w_out.weight", f"{a}.mlp.proj.weight", src)
    expect_shape(src, "transformer.adapter.weight", (d, 2 * d))
    out.copy("injection.W.weight", "transformer.adapter.weight", src)
    if cfg.injection_bias:
        out.copy("injection.W.bias", "transformer.adapter.bias", src)
    out.copy("final_norm.weight", "transformer.ln_f.weight", src)
    if "lm_head.weight" in src.keys() and not cfg.tie_embeddings:
        out.copy("head.weight", "lm_head.weight", src)
    elif not cfg.tie_embeddings:
        raise ConversionError(f"{src.path}: tie_embeddings is false but there is no lm_head.weight")
    elif "lm_head.weight" in src.keys():  # a tied head saved anyway: it must be the embedding
        if not torch.equal(src.tensor("lm_head.weight"), src.tensor("transformer.wte.weight")):
            raise ConversionError(
                "lm_head.weight: tie_embeddings is true but it differs from transformer.wte"
            )
        out.used.add("lm_head.weight")
    if "freqs_cis" in src.keys():
        _check_freqs(src, cfg)
        out.used.add("freqs_cis")
    return out


def _check_freqs(src: SourceDir, cfg: ModelConfig) -> None:
    """The stored rotary table must be the one our config computes (cos, sin of interleaved pairs)."""
    stored = src.tensor("freqs_cis")
    theirs = stored.float().reshape(-1, cfg.resolved_head_dim // 2, 2)
    ours = rope_table(cfg.resolved_head_dim, theirs.shape[0], cfg.rope_base).permute(1, 2, 0)
    atol = 1e-4 if stored.dtype == torch.float32 else 1e-2  # a bf16 copy of cos/sin is good to ~4e-3
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=atol):
        raise ConversionError("freqs_cis: the stored rotary table does not match rope_base / head_dim")
