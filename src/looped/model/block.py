"""The transformer block shared by prelude, core and coda: pre-norm or sandwich-norm residual layout."""

from __future__ import annotations

import torch
from torch import nn

from looped.config import ModelConfig
from looped.model.kv import LayerKV
from looped.model.layers import MLP, Attention, RMSNorm


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); sandwich adds a norm on each branch output (Huginn)."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg, value_embed)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)
        sandwich = cfg.block_norm == "sandwich"
        self.attn_out_norm = RMSNorm(cfg.width, cfg.norm_eps) if sandwich else None
        self.mlp_out_norm = RMSNorm(cfg.width, cfg.norm_eps) if sandwich else None

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None, kv: LayerKV | None = None
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), rope, ve, kv)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return x + m
