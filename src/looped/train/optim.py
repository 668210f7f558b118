"""Optimizers and learning-rate schedules: AdamW, or Muon for hidden matrices with AdamW for the rest (Parcae)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from looped.config import ConfigError, OptimConfig
from looped.precision import resolve_dtype
from looped.train.muon import Muon

# Blocks whose 2-D weights are "hidden matrices": Muon's domain, and the only weights that get weight decay.
# Embeddings, the head, norms and the injection (whose A_log, dt and B set the loop's stability) never decay.
_HIDDEN_PREFIXES = ("prelude.", "core.", "coda.", "readout.")


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else); a tied weight appears once. A LoopedLM inside another module (the
    vision and multimodal models' `body`, `vision`, `text`) is recognised by its parts' names."""
    hidden, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        name = name.removeprefix("module.")  # DDP
        in_blocks = any(f".{prefix}" in f".{name}" for prefix in _HIDDEN_PREFIXES)
        (hidden if p.ndim == 2 and in_blocks else rest).append(p)
    return hidden, rest


class Optimizers:
    """One or two torch optimizers stepped together; each group remembers its peak rate in `base_lr`."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def set_lr(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The current rate of the first optimizer (Muon's when Muon is used, else AdamW's), before any
        per-part multiplier."""
        group = self.optimizers[0].param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)


def build_optimizers(
    model: nn.Module, cfg: OptimConfig, sharded: bool = False, backprop_loops: int = 1
) -> Optimizers:
    """AdamW over all parameters, or Muon over hidden matrices plus AdamW over the rest; the core's and the
    injection's parameters at their own rates (optim.core_lr_scale with k = `backprop_loops`,
    optim.injection_lr_scale).

    Args:
        model: the (possibly DDP-wrapped) model.
        cfg: the [optim] section.
        sharded: parameters are FSDP2 shards (Muon needs whole matrices, so it is refused there).
        backprop_loops: k, the loops the core's gradient sums over.
    """
    hidden, rest = split_params(model)
    scale = part_lr_scales(model, cfg, backprop_loops)
    betas = (cfg.betas[0], cfg.betas[1])
    # The fused CPU kernel steps all tensors in one pass (about 5× faster than foreach here); DTensor shards
    # take the foreach path.
    fused = {"foreach": True} if sharded else {"fused": True}
    if cfg.optimizer == "adamw":
        groups = _scaled_groups(hidden, scale, cfg.lr, cfg.weight_decay)
        groups += _scaled_groups(rest, scale, cfg.lr, 0.0)
        return Optimizers([torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **fused)])
    if sharded:
        raise ConfigError(
            "optim.optimizer = 'muon' needs whole matrices; use train.parallel = 'ddp' or adamw"
        )
    opts: list[torch.optim.Optimizer] = []
    if hidden:
        opts.append(
            Muon(
                _scaled_groups(hidden, scale, cfg.muon_lr, cfg.weight_decay),
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
                nesterov=True,
                ns_dtype=resolve_dtype(cfg.muon_ns_dtype, hidden[0].device),
            )
        )
    if rest:
        groups = _scaled_groups(rest, scale, cfg.lr, 0.0)
        opts.append(torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **fused))
    return Optimizers(opts)


# Parameters of the injection's part: what carries e into the state and the state out to the coda.
_INJECTION_PREFIXES = ("injection.", "prelude_norm.", "readout.")


def part_lr_scales(model: nn.Module, cfg: OptimConfig, backprop_loops: int) -> dict[int, float]:
    """{id(parameter): its learning-rate multiplier} for the parameters not at 1: the core's (1/k or 1/√k
    with optim.core_lr_scale) and the injection's, prelude norm's and readout's (optim.injection_lr_scale)."""
    k = max(1, backprop_loops)
    core = {"1": 1.0, "1/k": 1.0 / k, "1/sqrt(k)": 1.0 / math.sqrt(k)}[cfg.core_lr_scale]
    scales = {}
    for name, p in model.named_parameters():
        dotted = "." + name.removeprefix("module.")
        if ".core." in dotted and core != 1.0:
            scales[id(p)] = core
        elif any(f".{prefix}" in dotted for prefix in _INJECTION_PREFIXES) and cfg.injection_lr_scale != 1.0:
            scales[id(p)] = cfg.injection_lr_scale
    return scales


def _scaled_groups(
    params: list[nn.Parameter], scale: dict[int, float], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups of `params` by learning-rate multiplier (one group when every multiplier is 1)."""
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p in params:
        by_scale.setdefault(scale.get(id(p), 1.0), []).append(p)
    return [
        {"params": ps, "lr": lr * s, "lr_scale": s, "weight_decay": weight_decay}
        for s, ps in sorted(by_scale.items(), reverse=True)
    ]


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at `step` (0-based) of `total_steps`: warmup, then the schedule's shape."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    low = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        cool_start = max(cfg.warmup_steps, total_steps * (1 - cfg.cooldown_fraction))
        if step < cool_start:
            return 1.0
        progress = (step - cool_start) / max(1.0, total_steps - cool_start)
        return 1 - (1 - low) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_summary(opts: Optimizers) -> dict[str, Any]:
    """Parameter counts per optimizer, for the run log."""
    return {
        type(o).__name__: sum(p.numel() for g in o.param_groups for p in g["params"]) for o in opts.optimizers
    }
