"""Native checkpoint directories: config.toml + model.safetensors + run.json (+ tokenizer.json), written
atomically, loaded by `looped.load`; `read_run` is the one reader of run.json, `check_tokenizer` the check
that a tokenizer belongs to the model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from looped.config import Config, ConfigError, from_dict, to_toml
from looped.errors import CheckpointError
from looped.model.lm import LoopedLM

CONFIG, WEIGHTS, RUN, TOKENIZER = "config.toml", "model.safetensors", "run.json", "tokenizer.json"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(**extra: Any) -> dict[str, Any]:
    """Provenance stored with every checkpoint: commit, versions, command line."""
    from looped import __version__

    return {
        "looped": __version__,
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        **extra,
    }


def state_dict_for_save(model: LoopedLM) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, the tied head left out (it is the embedding)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it is renamed into place (replacing `path`),
    so a killed writer leaves the previous directory or nothing, never half a directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def write_model_files(
    directory: Path, weights: dict[str, torch.Tensor], cfg: Config, tie_embeddings: bool, **run: Any
) -> None:
    """config.toml, model.safetensors (a tied head left out) and run.json into `directory`."""
    if tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "head.weight"}
    (directory / CONFIG).write_text(to_toml(cfg))
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
        str(directory / WEIGHTS),
        metadata={"format": "looped"},
    )
    (directory / RUN).write_text(json.dumps(run_info(**run), indent=2) + "\n")


def save(model: LoopedLM, path: str | Path, config: Config | None = None, **run: Any) -> Path:
    """Write a checkpoint directory atomically (see `atomic_dir`); `run` adds fields to run.json."""
    cfg = config or Config(model=model.cfg)
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model.state_dict(), cfg, model.cfg.tie_embeddings, **run)
    return Path(path)


def load_config_dir(path: str | Path) -> Config:
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path}: not a looped checkpoint directory (no {CONFIG})")
    try:
        return from_dict(tomllib.loads(file.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise CheckpointError(f"{file}: not valid TOML: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoopedLM:
    """Load a native checkpoint directory into a LoopedLM in eval mode. Every weight must be present and fit."""
    path = Path(path)
    kind = _model_class(path)
    if kind != "LoopedLM":
        raise CheckpointError(
            f"{path} holds a {kind} (a looped.tasks model), not a language model; evaluate it with `looped eval`"
        )
    model = load_module(path, lambda cfg: LoopedLM(cfg.model))
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def load_module(path: str | Path, build: Callable[[Config], torch.nn.Module]) -> torch.nn.Module:
    """The checkpoint's weights in the module `build(config)` makes (strictly, as `load_weights`), in eval
    mode: the loader of LoopedLM and of the task models that wrap one."""
    path = Path(path)
    cfg = load_config_dir(path)
    file = path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None
    model = build(cfg)
    load_weights(model, weights, str(file))
    return model.eval()


def _model_class(path: Path) -> str:
    """run.json's model_class: which module the weights belong to (LoopedLM unless a task model says so)."""
    return str(read_run(path).get("model_class", "LoopedLM"))


def read_run(path: str | Path) -> dict[str, Any]:
    """The checkpoint directory's run.json (provenance: commit, versions, command line, and what the writer
    added, e.g. task, model_class, tokenizer_sha256); {} when there is none. Raises CheckpointError naming
    the file when it is not a JSON object."""
    file = Path(path) / RUN
    try:
        text = file.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    try:
        run = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(run).__name__}")
    return run


def sha256(file: str | Path) -> str:
    """The file's sha256 as hex, read in chunks."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_tokenizer(path: str | Path, tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer that does not belong to the model in checkpoint `path`: another vocabulary size
    than `vocab_size`, or a tokenizer.json other than the one whose sha256 run.json recorded at training
    time. A converted checkpoint (run.json names its `source_format`) may have fewer tokens than embedding
    rows: released models pad their vocabulary. `tokenizer` is anything with a `vocab_size`."""
    path = Path(path)
    run = read_run(path)
    padded = run.get("source_format") is not None and tokenizer.vocab_size < vocab_size
    if tokenizer.vocab_size != vocab_size and not padded:
        raise CheckpointError(
            f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{vocab_size}: the tokenizer belongs to another model"
        )
    recorded = run.get("tokenizer_sha256")
    if recorded:
        actual = sha256(path / TOKENIZER)
        if actual != recorded:
            raise CheckpointError(
                f"{path / TOKENIZER} is not the tokenizer this model was trained with "
                f"(sha256 {actual[:12]}…, {RUN} records {recorded[:12]}…)"
            )


def load_weights(model: LoopedLM, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights into model strictly: missing, unexpected or mis-shaped keys are errors naming the key."""
    expected = state_dict_for_save(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: missing weight '{missing[0]}'"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected weight '{unexpected[0]}'"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: weight '{key}' has shape {tuple(weights[key].shape)}, the config needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(weights, strict=False)


def init_weights_from(model: LoopedLM, path: str | Path, grow_vocab: bool = False) -> None:
    """train.init_from: load a checkpoint's weights into a freshly built model (every weight must be present
    and fit), then apply the model's constraints. With `grow_vocab`, a checkpoint with a smaller vocabulary
    fits too: its embedding and head rows fill the first rows, the new tokens keep their fresh init (a
    curriculum from one task to another that adds tokens, e.g. prefix sums → parity)."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"train.init_from = {path}: no {WEIGHTS} there")
    weights = load_file(str(file))
    if grow_vocab:
        fresh = state_dict_for_save(model)
        for key in ("embed.weight", "head.weight"):
            old, new = weights.get(key), fresh.get(key)
            if old is not None and new is not None and old.shape[1:] == new.shape[1:]:
                if old.shape[0] < new.shape[0]:
                    weights[key] = torch.cat([old, new[old.shape[0] :].to(old.dtype)])
    load_weights(model, weights, str(file))
    model.constrain_()
