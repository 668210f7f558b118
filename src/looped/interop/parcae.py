"""Import Parcae checkpoints (sandyresearch/parcae layout: config.json + weights) as native looped checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from looped.checkpoint import CheckpointError, load_weights, save
from looped.config import Config, ConfigError, ModelConfig
from looped.errors import ConversionError
from looped.interop.hub import config_getter
from looped.model.layers import rope_table
from looped.model.lm import LoopedLM

WEIGHT_FILES = ("model.safetensors", "model.pt", "pytorch_model.bin")
DEFAULT_ROPE_BASE = 50000.0  # Parcae's default when config.json has no rope_settings

# Parcae module names → ours, per block and at the top level.
BLOCK_KEYS = {
    "norm_1.weight": "attn_norm.weight",
    "attn.c_q.weight": "attn.wq.weight",
    "attn.c_k.weight": "attn.wk.weight",
    "attn.c_v.weight": "attn.wv.weight",
    "attn.c_proj.weight": "attn.wo.weight",
    "attn.ve_gate.weight": "attn.ve_gate.weight",
    "norm_2.weight": "mlp_norm.weight",
    "mlp.fc.weight": "mlp.w_in.weight",
    "mlp.proj.weight": "mlp.w_out.weight",
}
TOP_KEYS = {
    "transformer.wte.weight": "embed.weight",
    "transformer.adapter.A_log": "injection.A_log",
    "transformer.adapter.dt_bias": "injection.dt_bias",
    "transformer.adapter.B": "injection.B.weight",
    "transformer.C.weight": "readout.weight",
    "transformer.ln_prelude.weight": "prelude_norm.weight",
    "transformer.ln_f.weight": "final_norm.weight",
    "lm_head.weight": "head.weight",
}
# Our config fields → the Parcae config.json keys they come from (for error messages).
OUR_NAMES = {
    "vocab_size": "padded_vocab_size",
    "width": "n_embd",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "mlp_hidden": "intermediate_size",
    "norm_eps": "norm_eps",
    "logit_softcap": "logit_softcap",
    "max_seq_len": "block_size",
    "prelude_layers": "n_layers_in_prelude",
    "core_layers": "n_layers_in_recurrent_block",
    "coda_layers": "n_layers_in_coda",
    "loops": "mean_recurrence",
}
STACKS = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
IGNORED = {"freqs_cis"}
PARCAE_RELU2_SCALE = (
    0.5  # measured against the parcae-tiny fixture: Parcae's MLP computes proj(0.5·relu(fc x)²)
)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConversionError(f"config.json: {key}: {message}")


def convert_config(pc: dict[str, Any], present: set[str] | None = None) -> ModelConfig:
    """A ModelConfig from Parcae's config.json; what looped cannot represent raises ConversionError naming the key.

    `present` (the state-dict keys) decides which layers carry value embeddings: a layer uses one only
    where both its table `value_embeds.i` and its attention's `ve_gate` exist.
    """
    get = config_getter(pc)
    _check_supported(get)
    d = get("n_embd", required=True)
    nonlin = {"ReLU2": "relu2"}[get("nonlin_name", "ReLU2")]
    rope = get("rope_settings") or {}
    p, c, k = (
        get(n, required=True)
        for n in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda")
    )
    ve_layers = None if present is None else _value_embed_layers(present, p, c, k)
    try:
        return ModelConfig(
            vocab_size=get("padded_vocab_size") or get("vocab_size", required=True),
            width=d,
            n_heads=get("num_attention_heads", required=True),
            n_kv_heads=get("num_key_value_heads"),
            mlp=nonlin,
            mlp_hidden=get("intermediate_size", required=True),
            norm_eps=float(get("norm_eps", 1e-5)),
            rope_base=float(rope.get("rope_base", DEFAULT_ROPE_BASE)),
            qk_norm=bool(get("qk_norm", False)),
            value_embeds=False,
            value_embed_layers=ve_layers if ve_layers else None,
            logit_softcap=get("logit_softcap"),
            tie_embeddings=bool(get("tie_embeddings", False)),
            max_seq_len=get("block_size", required=True),
            prelude_layers=p,
            core_layers=c,
            coda_layers=k,
            loops=max(1, int(get("mean_recurrence") or 4)),
            injection="diagonal",
            prelude_norm=bool(get("prelude_norm", False)),
            readout=True,
            state_init=get("state_init", "zero"),
        )
    except ConfigError as e:
        message = str(e)
        for ours, theirs in OUR_NAMES.items():  # speak in the source file's key names
            message = message.replace(f"model.{ours} ", f"{theirs} ")
        raise ConversionError(f"config.json: {message}") from None


def _check_supported(get: Callable[..., Any]) -> None:
    """Refuse, by key, every Parcae option that looped's model does not represent."""
    d = get("n_embd", required=True)
    for key in ("bias", "qk_bias", "use_abacus"):
        _require(not get(key, False), key, "must be false (looped blocks have no biases)")
    _require(get("clip_qkv") is None, "clip_qkv", "QKV clipping is not supported")
    _require(
        get("randomize_positions_from") is None,
        "randomize_positions_from",
        "randomized positions are not supported",
    )
    for key, default, ours in (
        ("block_class_name", "TransformerPreNormBlock", "TransformerPreNormBlock"),
        ("norm_class_name", "RMSNorm", "RMSNorm"),
        ("mlp_class_name", "BaseMLP", "BaseMLP"),
        ("nonlin_name", "ReLU2", "ReLU2"),
    ):
        _require(get(key, default) == ours, key, f"{get(key)!r} is not supported (only {ours})")
    _require(
        get("injection_type", "diagonal") == "diagonal",
        "injection_type",
        f"{get('injection_type')!r} is not supported (only diagonal is converted)",
    )
    rec = get("recurrent_embedding_dimension", d)
    _require(rec == d, "recurrent_embedding_dimension", f"{rec} differs from n_embd = {d}")
    rec_heads = get("recurrent_num_attention_heads")
    _require(
        rec_heads in (None, get("num_attention_heads")),
        "recurrent_num_attention_heads",
        "must equal num_attention_heads",
    )
    _require(get("mup_model_scaling_factor", 1) == 1, "mup_model_scaling_factor", "only 1 is supported")
    state_init = get("state_init", "zero")
    _require(
        state_init in ("zero", "normal", "like-init"),
        "state_init",
        f"{state_init!r} is not supported (zero, normal, like-init)",
    )
    rope = get("rope_settings") or {}
    _require(isinstance(rope, dict), "rope_settings", "must be an object")
    _require(rope.get("use_rope", True), "rope_settings.use_rope", "models without RoPE are not supported")
    _require(
        rope.get("rope_condense_ratio", 1) == 1, "rope_settings.rope_condense_ratio", "only 1 is supported"
    )


def _value_embed_layers(present: set[str], p: int, c: int, k: int) -> list[int]:
    """Layers whose value embedding Parcae's forward uses: both the table and the attention's gate exist."""
    gated = set()
    for stack, offset in (("prelude", 0), ("core_block", p), ("coda", p + c)):
        for i in range(max(p, c, k)):
            if f"transformer.{stack}.{i}.attn.ve_gate.weight" in present:
                gated.add(offset + i)
    return sorted(i for i in gated if f"value_embeds.{i}.weight" in present)


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Parcae weights from model.safetensors, model.pt or pytorch_model.bin (torch files only with weights_only=True)."""
    for name in WEIGHT_FILES:
        file = src / name
        if not file.is_file():
            continue
        try:
            if file.suffix == ".safetensors":
                sd = load_file(str(file))
            else:
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ConversionError(f"{file}: cannot read weights: {e}") from None
        for wrapper in ("model", "state_dict", "module"):  # training checkpoints nest the weights
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConversionError(f"{file}: expected a flat dict of tensors")
        out = {}
        for key, value in sd.items():
            for prefix in ("_orig_mod.", "module.", "model."):
                key = key.removeprefix(prefix)
            out[key] = value
        return out
    raise ConversionError(f"{src}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Parcae weights to ours; unknown keys are errors, unused value-embedding tables and gates are dropped."""
    ve = set(cfg.ve_layers)
    offsets = {"prelude": 0, "core_block": cfg.prelude_layers, "coda": cfg.prelude_layers + cfg.core_layers}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in IGNORED:
            continue
        if key in TOP_KEYS:
            if key == "lm_head.weight" and cfg.tie_embeddings:
                wte = sd.get("transformer.wte.weight")
                if wte is not None and not torch.equal(wte, value):
                    raise ConversionError(
                        f"{key}: tie_embeddings is true but lm_head differs from transformer.wte"
                    )
                continue
            out[TOP_KEYS[key]] = value
            continue
        parts = key.split(".")
        if parts[0] == "value_embeds" and len(parts) == 3 and parts[1].isdigit():
            if int(parts[1]) in ve:
                out[key] = value
            continue  # a table without a gate is never used by Parcae's forward
        if parts[0] == "transformer" and len(parts) > 3 and parts[1] in STACKS and parts[2].isdigit():
            rest = ".".join(parts[3:])
            if rest not in BLOCK_KEYS:
                raise ConversionError(f"{key}: unknown block weight '{rest}'")
            if rest == "attn.ve_gate.weight" and offsets[parts[1]] + int(parts[2]) not in ve:
                continue  # a gate without a table is never used
            if rest == "mlp.proj.weight":
                # Parcae's ReLU² is 0.5·relu(x)²; ours is relu(x)², so the factor moves into the output matrix (exact).
                value = value * PARCAE_RELU2_SCALE
            out[f"{STACKS[parts[1]]}.{parts[2]}.{BLOCK_KEYS[rest]}"] = value
            continue
        raise ConversionError(f"{key}: unknown Parcae weight")
    return {k: v.float() for k, v in out.items()}


def load_parcae(src: str | Path) -> LoopedLM:
    """A LoopedLM (eval mode) holding a Parcae checkpoint directory's weights."""
    src = Path(src)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{src}: no config.json (expected a Parcae checkpoint directory)")
    try:
        pc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file}: not valid JSON: {e}") from None
    if not isinstance(pc, dict):
        raise ConversionError(f"{cfg_file}: expected a JSON object of config keys, got {type(pc).__name__}")
    sd = read_state_dict(src)
    cfg = convert_config(pc, set(sd))
    if "freqs_cis" in sd:
        theirs = sd["freqs_cis"].float().reshape(-1, cfg.resolved_head_dim // 2, 2)
        ours = rope_table(cfg.resolved_head_dim, theirs.shape[0], cfg.rope_base).permute(1, 2, 0)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
            raise ConversionError(
                "freqs_cis: the stored rotary table does not match rope_base / head size from config.json"
            )
    model = LoopedLM(cfg)
    try:
        load_weights(model, convert_state_dict(sd, cfg), str(src))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return model.eval()


def convert_parcae(src: str | Path, out: str | Path) -> Path:
    """Convert a Parcae checkpoint directory into a native looped checkpoint directory at `out`."""
    model = load_parcae(src)
    return save(
        model, out, Config(model=model.cfg), converted_from=str(Path(src).resolve()), source_format="parcae"
    )
