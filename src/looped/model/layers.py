"""Building blocks of every block: RMSNorm, rotary embedding, attention (GQA, QK-norm, value embeddings) and MLPs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from looped.config import ModelConfig
from looped.model.kernels import relu2, rms_norm, rotate_pairs
from looped.model.kv import LayerAttention, LayerKV


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale: x / rms(x) · w."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_table(
    head_dim: int,
    max_len: int,
    base: float,
    device: torch.device | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """cos and sin of position·θ_i with θ_i = base^(-2i/head_dim) (then `scale`d, e.g. `llama3_scaling`);
    shape (2, max_len, head_dim // 2), float32."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scale is not None:
        theta = scale(theta)
    angle = torch.arange(max_len, dtype=torch.float64, device=device)[:, None] * theta[None, :]
    return torch.stack([angle.cos(), angle.sin()]).float()


def llama3_scaling(
    factor: float, low_freq_factor: float, high_freq_factor: float, original_max_len: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Llama 3.1's long-context RoPE scaling of the frequencies θ: wavelengths 2π/θ shorter than
    original_max_len / high_freq_factor are kept, those longer than original_max_len / low_freq_factor are
    divided by `factor`, and those between are interpolated linearly in original_max_len / wavelength."""

    def scale(theta: torch.Tensor) -> torch.Tensor:
        wavelength = 2 * math.pi / theta
        ratio = original_max_len / wavelength  # how many wavelengths fit the original context
        smooth = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
        return (1 - smooth) * theta / factor + smooth * theta

    return scale


def model_rope_table(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotary table of a model config: its base, head width, context and scaling."""
    scale = None
    if cfg.rope_scale_kind == "llama3":
        scale = llama3_scaling(
            cfg.rope_scale_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_len,
        )
    return rope_table(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_base, device, scale)


def grid_side(length: int) -> int:
    """The side of the square a grid-layout input of `length` tokens forms."""
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"model.layout = 'grid' needs a square input: {length} tokens is not a side²")
    return side


def rope_grid_table(head_dim: int, side: int, base: float) -> torch.Tensor:
    """A rotary table for a side × side grid in row-major order: the first half of the channel pairs turn
    with the row, the second half with the column (each half with its own frequencies, as a head of
    head_dim / 2). Shape (2, side², head_dim // 2), like `rope_table`."""
    half = rope_table(head_dim // 2, side, base)  # (2, side, head_dim // 4)
    rows = half[:, :, None].expand(2, side, side, head_dim // 4)
    cols = half[:, None, :].expand(2, side, side, head_dim // 4)
    return torch.cat([rows, cols], dim=-1).reshape(2, side * side, head_dim // 2)


def apply_rope(x: torch.Tensor, table: torch.Tensor, pairing: str = "interleaved") -> torch.Tensor:
    """Rotate channel pairs of x (B, S, H, hd) by the angles in table (2, S, hd/2).

    `pairing` "interleaved": adjacent channels (2i, 2i+1), as Parcae and Huginn lay out their complex rotary
    embedding; "half": channels (i, i + hd/2), the "rotate half" of GPT-NeoX, Llama, Qwen and Ouro. Both
    rotate pair i by the same angle; only which channels form the pair differs.
    The rotation is real arithmetic, (a, b) → (a·cos − b·sin, a·sin + b·cos): the same numbers as their complex
    product up to the last bit, and no complex tensor anywhere, which the ONNX and ExecuTorch exporters need.
    A table of shape (2, B, S, hd/2) gives each sequence its own positions (the KV-cached path).
    """
    table = table.to(torch.promote_types(table.dtype, torch.float32))  # a bfloat16 model casts it too
    rotation = (
        table[:, None, :, None, :] if table.ndim == 3 else table[:, :, :, None, :]
    )  # (2, ·, S, 1, hd/2)
    return rotate_pairs(x, rotation, pairing)  # (B, S, H, hd), backward by hand (model/kernels.py)


class Attention(nn.Module):
    """Self-attention (causal unless model.causal = false) with grouped-query heads, optional QK-norm and
    optional gated value embedding."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
        self.qk_norm, self.causal, self.window = cfg.qk_norm, cfg.causal, cfg.attn_window
        self.grid = cfg.layout == "grid"
        self.pairing = cfg.rope_pairing
        # Huginn's per-head bias on queries [0] and keys [1], added before RoPE: (2, 1, H, hd).
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_heads, self.hd)) if cfg.qk_bias else None
        self.wq = nn.Linear(cfg.width, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.width, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.width, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.width, bias=False)
        # The value-embedding gate reads the first few channels of the block input: 2·sigmoid(W x[:c]) ∈ (0, 2) per KV head.
        self.gate_channels = cfg.value_gate_channels
        self.ve_gate = nn.Linear(self.gate_channels, self.n_kv, bias=False) if value_embed else None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        ve: torch.Tensor | None = None,
        kv: LayerKV | LayerAttention | None = None,
    ) -> torch.Tensor:
        """x (B, S, D) → (B, S, D). With `kv` (a KV-cache layer, `looped.infer.cache`), this call's keys and
        values are stored and the queries attend to every cached key the cache makes visible."""
        B, S, _ = x.shape  # (B, S, D)
        q = self.wq(x).view(B, S, self.n_heads, self.hd)
        k = self.wk(x).view(B, S, self.n_kv, self.hd)
        v = self.wv(x).view(B, S, self.n_kv, self.hd)
        if self.ve_gate is not None and ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.gate_channels]))  # (B, S, n_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, S, self.n_kv, self.hd)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rope(q, rope, self.pairing), apply_rope(k, rope, self.pairing)
        if self.qk_norm:
            # Parameter-free, default eps: rotation keeps the norm, so order against RoPE does not matter.
            q, k = rms_norm(q), rms_norm(k)
        if kv is not None and hasattr(kv, "attend"):  # a LayerAttention: its kernel attends (vLLM)
            return self.wo(kv.attend(q, k, v))
        if kv is None:
            band = None
            if self.window is not None and self.grid:  # |Δrow| ≤ window and |Δcolumn| ≤ window
                side = grid_side(S)
                pos = torch.arange(S, device=x.device)
                r, c = pos // side, pos % side
                band = ((r[:, None] - r[None, :]).abs() <= self.window) & (
                    (c[:, None] - c[None, :]).abs() <= self.window
                )
            elif self.window is not None:  # |i − j| ≤ window (and j ≤ i when causal)
                pos = torch.arange(S, device=x.device)
                offset = pos[:, None] - pos[None, :]  # (S, S)
                band = (offset.abs() <= self.window) & ((offset >= 0) | (not self.causal))
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=band,
                is_causal=self.causal and band is None,
                enable_gqa=self.n_kv != self.n_heads,
            )  # (B, H, S, hd)
        else:
            keys, values, mask, causal = kv.update(k, v)  # (B, n_kv, S_cache, hd) ×2, (B, 1, S, S_cache)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys,
                values,
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=self.n_kv != self.n_heads,
            )
        return self.wo(y.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))


class MLP(nn.Module):
    """Feed-forward: swiglu (w_out(silu(w_gate x) · w_in x)), relu2 (w_out(relu(w_in x)²)) or gelu."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.w_in = nn.Linear(cfg.width, cfg.resolved_mlp_hidden, bias=False)
        self.w_gate = (
            nn.Linear(cfg.width, cfg.resolved_mlp_hidden, bias=False) if cfg.mlp == "swiglu" else None
        )
        self.w_out = nn.Linear(cfg.resolved_mlp_hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.w_gate is not None:
            h = F.silu(self.w_gate(x)) * h
        elif self.kind == "relu2":
            h = relu2(h, inplace=True)  # h is this call's own projection
        else:
            h = F.gelu(h)
        return self.w_out(h)
