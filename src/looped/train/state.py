"""Resumable training state: the run's counters (`TrainState`) and its checkpoints — model, optimizer,
counters, loader position and RNG state, written atomically, last K kept, verified by sha256 on resume so
that a truncated or corrupt checkpoint falls back to the previous one — and the roll-back to them."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
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

from looped.checkpoint import WEIGHTS, atomic_dir, sha256, write_model_files
from looped.config import Config, ConfigError, TrainConfig
from looped.distributed import Dist, barrier, unwrap
from looped.errors import TrainingError
from looped.train.optim import Optimizers

TRAINER, OPTIMIZER = "trainer.json", "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainingStopped(TrainingError):
    """SIGINT or SIGTERM stopped a run that returns no result (task training) after it saved a checkpoint;
    the message names it, and resuming continues from it."""


@dataclass
class TrainState:
    """The counters a run carries from step to step; trainer.json stores them with every checkpoint."""

    step: int = 0  # optimizer steps done (a skipped non-finite step counts)
    tokens: int = 0  # training tokens seen
    flops: float = 0.0  # training FLOPs (model.flops_per_token(training=True) at each drawn depth)
    seconds: float = 0.0  # time spent in steps, over every session of the run
    lr_scale: float = 1.0  # the learning-rate factor left by roll-backs
    skipped: int = 0  # non-finite steps skipped
    rollbacks: int = 0  # roll-backs to a checkpoint

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainState:
        """The counters in a trainer.json record (a field an older checkpoint lacks keeps its default: its
        FLOPs are then counted from the resume on)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


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
    state: TrainState,
    model: nn.Module,
    opts: Optimizers,
    cfg: Config,
    d: Dist,
    keep: int,
    tokenizer_file: Path | None = None,
    extra: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> Path | None:
    """Write run_dir/checkpoints/step_NNNNNNN at `state.step` (rank 0 writes; all ranks gather), then prune
    to the newest `keep`.

    Args:
        run_dir: the run directory.
        state: the counters, stored in trainer.json.
        model: the model being trained (DDP-wrapped or FSDP2-sharded under torchrun).
        opts: its optimizers.
        cfg: the resolved config, stored as config.toml.
        d: the process group position.
        keep: checkpoints kept.
        tokenizer_file: copied in (and its sha256 noted in run.json), so the checkpoint loads on its own.
        extra: more trainer.json fields (the data loader's position, a task's log).
        run: more run.json fields (a task model's task and class).
    """
    weights = full_model_state(model)
    fresh = not any(o.state for o in opts.optimizers)
    optim = get_optimizer_state_dict(
        model, opts.optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if fresh:
        # torch fills an empty optimizer's state by a zero-gradient step at lr 0 (AdamW's step count becomes 1),
        # which would make the first real update ~0.75× its size through the bias correction: forget it again.
        _clear_state(opts)
    path = None
    if d.main:
        path = run_dir / "checkpoints" / f"step_{state.step:07d}"
        with atomic_dir(path) as tmp:
            info = dict(run or {})
            if tokenizer_file is not None:
                info["tokenizer_sha256"] = sha256(tokenizer_file)
            tie = unwrap(model).cfg.tie_embeddings
            write_model_files(tmp, weights, cfg, tie, world_size=d.world, step=state.step, **info)
            torch.save(optim, tmp / OPTIMIZER)
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            record = {**asdict(state), **(extra or {}), "rng": rng_state()}
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


def load_training(path: Path, model: nn.Module, opts: Optimizers) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer and RNG state in place (every rank reads the files); returns the counters and
    the whole trainer.json record (for the fields `save_training` was given as `extra`)."""
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / WEIGHTS}: cannot read: {e}") from None
    if unwrap(model).cfg.tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    optim = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, opts.optimizers, optim, options=StateDictOptions(full_state_dict=True))
    record = json.loads((path / TRAINER).read_text())
    if record.get("step") == 0:
        _clear_state(opts)  # a step-0 checkpoint holds the placeholder state save_training forgot (see there)
    set_rng_state(record["rng"])
    return TrainState.from_record(record), record


def _clear_state(opts: Optimizers) -> None:
    for o in opts.optimizers:
        o.state.clear()


def resume_point(run_dir: Path, resume: bool, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint a run starts from: None for a fresh run, else the newest intact one.

    Raises:
        ConfigError: the directory holds checkpoints but `resume` is off (a run is never overwritten).
        TrainingError: `resume` is on and every checkpoint there is damaged.
    """
    found = checkpoints(run_dir)
    if found and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or pick another train.out"
        )
    if not found:
        return None  # --resume on a run that never checkpointed starts it afresh
    path = latest_valid(run_dir, warn=warn)
    if path is None:
        raise TrainingError(f"{run_dir}: no intact checkpoint to resume from")
    return path


def roll_back(
    run_dir: Path,
    state: TrainState,
    tc: TrainConfig,
    restore: Callable[[Path], TrainState],
    warn: Callable[[str], None] = print,
) -> TrainState:
    """After train.max_bad_steps non-finite steps in a row: `restore` the newest intact checkpoint (the
    caller's loader of weights, optimizer and whatever else it saved) and return its counters with the
    learning rate scaled by train.rollback_lr_scale and the skipped steps kept; or raise TrainingError once
    train.max_rollbacks roll-backs did not help."""
    rollbacks = state.rollbacks + 1
    if rollbacks > tc.max_rollbacks:
        raise TrainingError(
            f"{tc.max_bad_steps} non-finite steps in a row after {tc.max_rollbacks} roll-backs; the run diverges "
            f"(try a lower optim.lr, loops.backprop_loops or model.spectral_norm)"
        )
    path = latest_valid(run_dir, warn=warn)
    if path is None:
        raise TrainingError(f"{run_dir}: diverged and there is no intact checkpoint to roll back to")
    restored = restore(path)
    restored.lr_scale = state.lr_scale * tc.rollback_lr_scale
    restored.rollbacks = rollbacks
    restored.skipped = state.skipped
    warn(
        f"step {state.step}: {tc.max_bad_steps} non-finite steps in a row; rolled back to step "
        f"{restored.step} with the learning rate × {restored.lr_scale:g} (roll-back {rollbacks}/{tc.max_rollbacks})"
    )
    return restored
