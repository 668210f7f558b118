"""Training from a checkpoint at another depth: `looped finetune` (continue a looped model at another mean
loop count) and `looped retrofit` (turn a trained standard model into a looped one, then train it).

Retrofitting follows McLeish et al. 2025 ("Teaching Pretrained Language Models to Think Deeper with
Retrofitted Recurrence", arXiv 2511.07384): the prelude takes the first layers of the standard model, the
coda its last layers, and the core starts from layers in the middle; embeddings, value embeddings where the
layer keeps one, the final norm and the head carry over. The injection starts as in a fresh model
(B = I, decay ≈ 0.447) and the readout as the identity, so that the state reaches the coda unscaled.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from looped.checkpoint import CheckpointError, load, load_config_dir, save
from looped.config import Config, from_dict, load_config
from looped.model.looped import LoopedLM
from looped.train.trainer import TrainResult, train


def _with(checkpoint: Path, files: list[str], overrides: list[str]) -> Config:
    """The checkpoint's config, then more files and `--set` overrides on top (the usual precedence)."""
    load_config_dir(checkpoint)  # a clear error when it is not a checkpoint directory
    return load_config([checkpoint / "config.toml", *files], overrides)


def finetune(
    checkpoint: str | Path, files: list[str], overrides: list[str], resume: bool = False
) -> TrainResult:
    """Continue training `checkpoint` with its own config changed by `files` and `overrides` (e.g.
    loops.mean_loops=8): fresh optimizer and schedule, weights from the checkpoint. The run goes to
    train.out if set, otherwise beside the checkpoint as NAME-finetune."""
    checkpoint = Path(checkpoint)
    cfg = _with(checkpoint, files, overrides)
    tree = cfg.to_dict()
    if not any(o.startswith("train.out=") for o in overrides):
        tree["train"]["out"] = str(checkpoint.parent / f"{checkpoint.name}-finetune")
    tree["train"]["init_from"] = str(checkpoint)
    return train(from_dict(tree), resume=resume)


def retrofit_model(standard: LoopedLM, prelude: int, core: int, coda: int, loops: int) -> LoopedLM:
    """A looped model whose prelude, core and coda blocks are copies of `standard`'s first, middle and last
    layers; see the module docstring."""
    src = standard.cfg
    if src.looped:
        raise CheckpointError("looped retrofit needs a standard model (model.core_layers = 0)")
    n = src.n_layers
    if min(prelude, core, coda) < 0 or core < 1 or prelude + core + coda > n:
        raise CheckpointError(
            f"retrofit layers {prelude}/{core}/{coda} need 0 ≤ prelude, coda, 1 ≤ core and at most the "
            f"standard model's {n} layers in all"
        )
    cfg = dataclasses.replace(
        src, prelude_layers=prelude, core_layers=core, coda_layers=coda, loops=loops, value_embed_layers=None
    )
    model = LoopedLM(cfg)
    start = prelude + (n - prelude - core - coda) // 2  # the core comes from the middle of what is left
    sources = list(range(prelude)) + list(range(start, start + core)) + list(range(n - coda, n))
    blocks = [*model.prelude, *model.core, *model.coda]
    theirs_all = [*standard.prelude, *standard.coda]  # a standard model's layers, in order
    with torch.no_grad():
        model.embed.weight.copy_(standard.embed.weight)
        model.final_norm.weight.copy_(standard.final_norm.weight)
        if not cfg.tie_embeddings:
            model.head.weight.copy_(standard.head.weight)
        for j, (block, i) in enumerate(zip(blocks, sources, strict=True)):
            theirs = theirs_all[i]
            mine = block.state_dict()
            for key, value in theirs.state_dict().items():
                if key in mine and mine[key].shape == value.shape:
                    mine[key] = value
            block.load_state_dict(mine)
            if str(j) in model.value_embeds and str(i) in standard.value_embeds:
                model.value_embeds[str(j)].weight.copy_(standard.value_embeds[str(i)].weight)
        if model.readout is not None:
            model.readout.weight.copy_(torch.eye(cfg.width))
    return model


def retrofit(
    checkpoint: str | Path,
    layers: tuple[int, int, int],
    files: list[str],
    overrides: list[str],
    resume: bool = False,
) -> TrainResult:
    """Retrofit a standard checkpoint into prelude/core/coda = `layers` and train it with loop sampling
    (the config's [loops], changed by `files` and `overrides`). The converted weights are kept in
    train.out/retrofit-init; the run goes to train.out if set, otherwise beside the checkpoint."""
    checkpoint = Path(checkpoint)
    cfg = _with(checkpoint, files, overrides)
    out = (
        Path(cfg.train.out)
        if any(o.startswith("train.out=") for o in overrides)
        else checkpoint.parent / f"{checkpoint.name}-retrofit"
    )
    init = out / "retrofit-init"
    if not (init / "model.safetensors").is_file():
        model = retrofit_model(load(checkpoint), *layers, loops=max(1, round(cfg.loops.mean_loops)))
        tree = cfg.to_dict()
        tree["model"] = model.cfg.to_dict()
        save(model, init, from_dict(tree), retrofit_of=str(checkpoint))
        if (checkpoint / "tokenizer.json").is_file():
            shutil.copyfile(checkpoint / "tokenizer.json", init / "tokenizer.json")
    tree = cfg.to_dict()
    tree["model"] = load_config_dir(init).model.to_dict()
    tree["train"].update(out=str(out), init_from=str(init))
    return train(from_dict(tree), resume=resume)
