"""Fixtures shared across test folders: a tiny trained checkpoint (trained once per session, in seconds); tests
marked `gpu` skip, saying why, where CUDA is absent."""

from __future__ import annotations

import pytest
from helpers import train_config, write_corpus

from looped.data.prepare import prepare
from looped.train.trainer import train


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests with the reason when this machine has no CUDA device (torch is only asked when
    such a test was collected)."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: none visible to torch {torch.__version__} ({build})")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A checkpoint directory (weights, config, tokenizer) of a small model trained at μ = 4 loops."""
    root = tmp_path_factory.mktemp("trained")
    prepare(write_corpus(root / "text"), root / "tokens", tokenizer="bytes", val_fraction=0.1, progress=False)
    cfg = train_config(
        root / "tokens",
        root / "run",
        model={"width": 64, "n_heads": 4, "loops": 4, "max_seq_len": 64},
        loops={"mean_loops": 4.0, "backprop_loops": 2},
        data={"seq_len": 64},
        optim={"lr": 1e-2, "warmup_steps": 5},
        train={"steps": 120, "global_batch": 8, "checkpoint_every": 1000},
        eval={"every": 0, "loops": [4]},
    )
    return train(cfg).final


@pytest.fixture(scope="session")
def exported(trained):
    """`trained` exported by `looped export onnx` with int8 graphs and its validation loss measured: the
    folder (about a minute, once per session). Skips, saying why, without the onnx extra."""
    from helpers import require_optional

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require_optional(module, "onnx")
    from looped.interop.onnx_export import export_onnx

    out = trained.parent / "edge"
    if not (out / "manifest.json").is_file():
        export_onnx(trained, out, quantize="int8", progress=False)
    return out


@pytest.fixture(scope="session")
def executorch_exported(trained):
    """`trained` exported by `looped export executorch` (portable and XNNPACK programs): the folder (a minute
    or two, once per session). Skips, saying why, without executorch."""
    from helpers import require_optional

    require_optional("executorch", "executorch")
    from looped.interop.executorch_export import export_executorch

    out = trained.parent / "executorch"
    if not (out / "manifest.json").is_file():
        export_executorch(trained, out, progress=False)
    return out
