"""Distributed set-up: one code path for a single process and for torchrun (DDP or FSDP2; gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from looped.config import TrainConfig


@dataclass
class Dist:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def train_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device a training process runs on: CUDA device `local_rank` for train.device "cuda" (or "auto" where
    CUDA is available), else the CPU. (`looped.infer.engine.resolve_device` places models for inference.)"""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(cfg: TrainConfig) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = train_device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    """DDP, or FSDP2 with each prelude and coda block its own unit and the root holding embed, core and head.

    The core stays in the root unit because it runs many times per forward: one all-gather per step serves
    every loop, and its gradients are reduced once, after all loops' contributions are summed.
    """
    if not d.enabled:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in [*model.prelude, *model.coda]:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The LoopedLM inside a DDP wrapper (FSDP2 modifies the model in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is unchanged)."""
    out = values.detach().clone()
    if d.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_max(value: int, d: Dist) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
