"""Shared test helpers: tiny configs and the path to ../shared/fixtures (skipped, or failed in CI, when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from looped import LoopedLM, ModelConfig

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_dir(name: str) -> Path:
    """A folder under ../shared/fixtures; skips with the reason when absent, fails when LOOPED_REQUIRE_FIXTURES=1."""
    path = FIXTURES / name
    if not path.is_dir():
        message = f"fixture {path} is absent (it ships beside the repository, not in it)"
        if os.environ.get("LOOPED_REQUIRE_FIXTURES") == "1":
            pytest.fail(message + "; LOOPED_REQUIRE_FIXTURES=1 makes this a failure")
        pytest.skip(message)
    return path


def tiny(**overrides) -> ModelConfig:
    """A small looped config whose every part is active (value embeddings, readout, prelude norm)."""
    base = dict(
        vocab_size=97,
        width=32,
        n_heads=4,
        prelude_layers=1,
        core_layers=2,
        coda_layers=1,
        loops=3,
        max_seq_len=32,
        value_embeds=True,
        value_gate_channels=8,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(model: LoopedLM, seed: int = 0) -> LoopedLM:
    """Give every parameter random values (Parcae's init zeroes output projections, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen)) if "norm" in name else p.copy_(
                    0.5 * torch.randn(p.shape, generator=gen)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def ids(batch: int = 2, seq: int = 12, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
