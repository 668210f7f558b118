"""Building blocks of every block: RMSNorm, rotary embedding, attention (GQA, QK-norm, value embeddings) and MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from looped.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale: x / rms(x) · w."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(head_dim: int, max_len: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin of position·θ_i with θ_i = base^(-2i/head_dim); shape (2, max_len, head_dim // 2), float32."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angle = torch.arange(max_len, dtype=torch.float64, device=device)[:, None] * theta[None, :]
    return torch.stack([angle.cos(), angle.sin()]).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, S, H, hd) by the angles in table (2, S, hd/2).

    Interleaved pairs, as Parcae and Huginn lay out their complex rotary embedding (not the half-split of GPT-NeoX).
    """
    cos, sin = table[0][None, :, None, :], table[1][None, :, None, :]  # (1, S, 1, hd/2)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, optional QK-norm and optional gated value embedding."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        self.qk_norm = cfg.qk_norm
        self.wq = nn.Linear(cfg.width, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.width, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.width, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.width, bias=False)
        # The value-embedding gate reads the first few channels of the block input: 2·sigmoid(W x[:c]) ∈ (0, 2) per KV head.
        self.gate_channels = cfg.value_gate_channels
        self.ve_gate = nn.Linear(self.gate_channels, self.n_kv, bias=False) if value_embed else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape  # (B, S, D)
        q = self.wq(x).view(B, S, self.n_heads, self.hd)
        k = self.wk(x).view(B, S, self.n_kv, self.hd)
        v = self.wv(x).view(B, S, self.n_kv, self.hd)
        if self.ve_gate is not None and ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.gate_channels]))  # (B, S, n_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, S, self.n_kv, self.hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.qk_norm:
            # Parameter-free, default eps: rotation keeps the norm, so order against RoPE does not matter.
            q, k = F.rms_norm(q, (self.hd,)), F.rms_norm(k, (self.hd,))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_kv != self.n_heads,
        )  # (B, H, S, hd)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))


class MLP(nn.Module):
    """Feed-forward: swiglu (w_out(silu(w_gate x) · w_in x)), relu2 (w_out(relu(w_in x)²)) or gelu."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.w_in = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.w_gate = nn.Linear(cfg.width, cfg.hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.w_out = nn.Linear(cfg.hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.w_gate is not None:
            h = F.silu(self.w_gate(x)) * h
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.w_out(h)
