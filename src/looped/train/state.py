"""Training checkpoints: model, optimizer, loader, sampler and RNG state, written atomically, last K kept,
verified by sha256 on resume so that a truncated or corrupt checkpoint falls back to the previous one."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from looped.checkpoint import WEIGHTS, atomic_dir, write_model_files
from looped.config import Config
from looped.distributed import Dist, barrier
from looped.train.optim import Optimizers

TRAINER, OPTIMIZER = "trainer.json", "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights keyed like the plain LoopedLM (collective under FSDP2: every rank calls it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training(
    run_dir: Path,
    step: int,
    model: nn.Module,
    opts: Optimizers,
    cfg: Config,
    tokenizer_file: Path | None,
    state: dict[str, Any],
    d: Dist,
    keep: int,
) -> Path | None:
    """Write run_dir/checkpoints/step_NNNNNNN (rank 0 writes; all ranks gather), then prune to the last `keep`."""
    weights = full_model_state(model)
    optim = get_optimizer_state_dict(
        model, opts.optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    path = None
    if d.main:
        path = run_dir / "checkpoints" / f"step_{step:07d}"
        with atomic_dir(path) as tmp:
            tok = {"tokenizer_sha256": sha256(tokenizer_file)} if tokenizer_file is not None else {}
            write_model_files(
                tmp, weights, cfg, cfg.model.tie_embeddings, world_size=d.world, step=step, **tok
            )
            torch.save(optim, tmp / OPTIMIZER)
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            record = {**state, "step": step, "rng": rng_state()}
            record["sha256"] = {name: sha256(tmp / name) for name in (WEIGHTS, OPTIMIZER)}
            (tmp / TRAINER).write_text(json.dumps(record, indent=1) + "\n")
        for old in checkpoints(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return path


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    try:
        record = json.loads((path / TRAINER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{TRAINER} unreadable ({e.__class__.__name__})"
    for name, digest in record.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if sha256(file) != digest:
            return f"{name} does not match its sha256 (truncated or corrupt)"
    if not record.get("sha256"):
        return f"{TRAINER} lists no file hashes"
    return None


def latest_valid(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; each one skipped is reported with its reason."""
    for path in checkpoints(run_dir):
        reason = verify(path)
        if reason is None:
            return path
        warn(f"checkpoint {path} is unusable: {reason}; trying the previous one")
    return None


def load_training(path: Path, model: nn.Module, opts: Optimizers, tie_embeddings: bool) -> dict[str, Any]:
    """Restore model and optimizer state in place (every rank reads the files); returns the trainer record."""
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / WEIGHTS}: cannot read: {e}") from None
    if tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    optim = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, opts.optimizers, optim, options=StateDictOptions(full_state_dict=True))
    record = json.loads((path / TRAINER).read_text())
    set_rng_state(record["rng"])
    return record
