"""The transformer block shared by prelude, core and coda: pre-norm, sandwich or sandwich-residual layout."""

from __future__ import annotations

import torch
from torch import nn

from looped.config import ModelConfig
from looped.model.kv import LayerAttention, LayerKV
from looped.model.layers import MLP, Attention, RMSNorm


class Block(nn.Module):
    """Two residual branches, attention then MLP, each reading norm(x) (`attn_norm`, `mlp_norm`). The second
    norm of each branch (`attn_out_norm`, `mlp_out_norm`) depends on `model.block_norm`:
    - pre-norm: none, x + f(norm(x));
    - sandwich: on the branch output, x + norm(f(norm(x))) (Ouro);
    - sandwich-residual: on the residual stream after the add, norm(x + f(norm(x))) (Huginn).
    """

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg, value_embed)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)
        second = cfg.block_norm != "pre-norm"
        self.attn_out_norm = RMSNorm(cfg.width, cfg.norm_eps) if second else None
        self.mlp_out_norm = RMSNorm(cfg.width, cfg.norm_eps) if second else None
        self.residual_norm = cfg.block_norm == "sandwich-residual"

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        ve: torch.Tensor | None = None,
        kv: LayerKV | LayerAttention | None = None,
    ) -> torch.Tensor:
        x = self._branch(x, self.attn(self.attn_norm(x), rope, ve, kv), self.attn_out_norm)
        return self._branch(x, self.mlp(self.mlp_norm(x)), self.mlp_out_norm)

    def _branch(self, x: torch.Tensor, out: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        if self.residual_norm:
            return norm(_add(out, x))
        return _add(out if norm is None else norm(out), x)


def _add(fresh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + fresh, where `fresh` is a branch output nobody else holds: without autograd it is added into in
    place (one allocation fewer per residual; the same numbers, + commutes exactly). x itself is never
    written, since callers keep it (the loop state, the injected e). A forward hook that keeps the output
    of `attn` or `mlp` under no_grad should clone it: it is the residual sum afterwards."""
    if torch.is_grad_enabled() or fresh.shape != x.shape or fresh.dtype != x.dtype:
        return x + fresh
    return fresh.add_(x)
