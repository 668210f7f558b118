"""Ouro (ByteDance; Ouro-1.4B, 2.6B and their -Thinking variants, `model_type: ouro`) as a LoopedLM config.

Ouro loops its whole stack: no prelude, no coda and nothing re-injected (`injection = none`: the embedding
is the initial state). Each layer is a sandwich of four norms whose names mislead — `input_layernorm` is in
front of attention, `input_layernorm_2` on its output, `post_attention_layernorm` in front of the MLP and
`post_attention_layernorm_2` on its output (our `sandwich`: x + norm(f(norm(x)))). After every loop the
final norm `model.norm` is applied, and that normed state both feeds the next loop and goes to the head
(`final_norm = every-loop`). RoPE is rotate-half at θ = `rope_theta`. A learned gate
`model.early_exit_gate` Linear(H, 1) gives each loop's exit probability (`exit_gate`), which `--exit gate:P`
turns into compute saved: the original computes every loop anyway.
"""

from __future__ import annotations

from typing import Any

from looped.config import ConfigError, ModelConfig
from looped.errors import ConversionError
from looped.interop.hub import Plan, SourceDir, config_getter, expect_shape

NORMS = {
    "input_layernorm": "attn_norm",
    "input_layernorm_2": "attn_out_norm",
    "post_attention_layernorm": "mlp_norm",
    "post_attention_layernorm_2": "mlp_out_norm",
}


def is_ouro(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "ouro"


def model_config(src: SourceDir) -> ModelConfig:
    """Our config for an Ouro folder; what we cannot represent raises ConversionError naming the key."""
    c = src.config

    get = config_getter(c)
    if c.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window: sliding-window attention is not supported")
    if c.get("rope_scaling"):
        raise ConversionError(f"config.json: rope_scaling {c['rope_scaling']!r} is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {c['hidden_act']!r} is not supported (silu)")
    width, heads = get("hidden_size", required=True), get("num_attention_heads", required=True)
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or width // heads
    try:
        return ModelConfig(
            vocab_size=get("vocab_size", required=True),
            width=width,
            n_heads=heads,
            n_kv_heads=kv_heads if kv_heads != heads else None,
            head_dim=head_dim if head_dim != width // heads else None,
            mlp="swiglu",
            mlp_hidden=get("intermediate_size", required=True),
            block_norm="sandwich",
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_base=float(c.get("rope_theta", 10000.0)),  # the config class's default when absent
            rope_pairing="half",
            qk_norm=False,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_seq_len=get("max_position_embeddings", required=True),
            prelude_layers=0,
            core_layers=get("num_hidden_layers", required=True),
            coda_layers=0,
            loops=int(c.get("total_ut_steps", 4)),
            injection="none",
            prelude_norm=False,
            readout=False,
            final_norm="every-loop",
            exit_gate=True,
            state_init="zero",
        )
    except ConfigError as e:
        raise ConversionError(f"config.json: {e}") from None


def plan(src: SourceDir) -> Plan:
    """Our weights from Ouro's (renamed one to one); checks every shape."""
    cfg = model_config(src)
    out = Plan(cfg)
    d, hd, h = cfg.width, cfg.resolved_head_dim, cfg.resolved_mlp_hidden
    q, kv = cfg.n_heads * hd, cfg.resolved_n_kv_heads * hd
    expect_shape(src, "model.embed_tokens.weight", (cfg.vocab_size, d))
    out.copy("embed.weight", "model.embed_tokens.weight", src)
    for i in range(cfg.core_layers):
        a, b = f"model.layers.{i}", f"core.{i}"
        for theirs, ours in NORMS.items():
            expect_shape(src, f"{a}.{theirs}.weight", (d,))
            out.copy(f"{b}.{ours}.weight", f"{a}.{theirs}.weight", src)
        for theirs, ours, shape in (
            ("self_attn.q_proj", "attn.wq", (q, d)),
            ("self_attn.k_proj", "attn.wk", (kv, d)),
            ("self_attn.v_proj", "attn.wv", (kv, d)),
            ("self_attn.o_proj", "attn.wo", (d, q)),
            ("mlp.gate_proj", "mlp.w_gate", (h, d)),
            ("mlp.up_proj", "mlp.w_in", (h, d)),
            ("mlp.down_proj", "mlp.w_out", (d, h)),
        ):
            expect_shape(src, f"{a}.{theirs}.weight", shape)
            out.copy(f"{b}.{ours}.weight", f"{a}.{theirs}.weight", src)
    out.copy("final_norm.weight", "model.norm.weight", src)
    expect_shape(src, "model.early_exit_gate.weight", (1, d))
    out.copy("exit_gate.weight", "model.early_exit_gate.weight", src)
    out.copy("exit_gate.bias", "model.early_exit_gate.bias", src)
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in src.keys():
            raise ConversionError(f"{src.path}: tie_word_embeddings is false but there is no lm_head.weight")
        out.copy("head.weight", "lm_head.weight", src)
    elif "lm_head.weight" in src.keys():
        out.used.add("lm_head.weight")  # a tied copy saved anyway
    return out
