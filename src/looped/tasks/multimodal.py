"""A small two-stream multimodal model: a looped vision stream reads a digit image (`looped.tasks.vision`), a
looped text stream reads and writes the digit's name, and each stream has its own core and its own loop
count, so compute can be spent unevenly between seeing and saying.

Text, one character per token, in two kinds of example (half of each in training):
- write: [WRITE] → the name, then [END] ("seven[END]"), predicted a token at a time (causal);
- read:  [READ] n a m e [ASK] → [YES] if the name is the image's digit, else [NO] (a wrong name half the time).

The vision stream is an encoder over 2 × 2 patches (as LoopedViT) whose normed final states, mapped by a
linear bridge, are a prefix that every text token can attend to. The text stream is a causal LoopedLM over
[image prefix; text]. Whole-answer exact match under teacher forcing equals greedy decoding's exact match,
so that is what `evaluate_multimodal` measures, for writing and for reading, on a grid of the two loop counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from looped.config import ModelConfig
from looped.model.lm import LoopedLM, LoopedOutput
from looped.tasks.generators import IGNORE, solved
from looped.tasks.vision import (
    VISION_TASKS,
    digit_images,
    patchify,
    shift,
    split_indices,
    stream_config,
    vision_model_config,
)

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = sorted(set("".join(NAMES)))
PAD, WRITE, READ, ASK, YES, NO, END = range(7)
VOCAB = 7 + len(LETTERS)
TEXT_LEN = 2 + max(len(n) for n in NAMES)  # [WRITE] name [END] or [READ] name [ASK]
IMAGE = VISION_TASKS["digits"]

MULTIMODAL_TASKS = ("digit_names",)


def spell(name: str) -> list[int]:
    return [7 + LETTERS.index(c) for c in name]


def text_of(tokens: list[int]) -> str:
    """Tokens back to text, the special ones in brackets: for messages and docs."""
    special = ("", "[WRITE]", "[READ]", "[ASK]", "[YES]", "[NO]", "[END]")
    return "".join(special[t] if t < 7 else LETTERS[t - 7] for t in tokens)


def examples(digits: np.ndarray, write: np.ndarray, shown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text inputs and targets (n, TEXT_LEN): write examples name `digits`; read examples show the name of
    `shown` and ask whether it is the image's digit."""
    n = len(digits)
    x = np.full((n, TEXT_LEN), PAD, dtype=np.int64)
    y = np.full((n, TEXT_LEN), IGNORE, dtype=np.int64)
    for k in range(n):
        if write[k]:
            seq = [WRITE, *spell(NAMES[digits[k]]), END]
            x[k, : len(seq) - 1] = seq[:-1]
            y[k, : len(seq) - 1] = seq[1:]
        else:
            seq = [READ, *spell(NAMES[shown[k]]), ASK]
            x[k, : len(seq)] = seq
            y[k, len(seq) - 1] = YES if shown[k] == digits[k] else NO
    return x, y


def batch(split: str, n: int | None, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((images (n, 1, 8, 8), text (n, TEXT_LEN)), targets (n, TEXT_LEN)). Training draws n shifted images
    with replacement and writes or reads at random; the test split holds every test image twice, once to
    write its name and once to read a name (its own for half of them)."""
    images, labels = digit_images()
    idx = split_indices(split)
    rng = np.random.default_rng([seed, 77])
    if split == "train":
        idx = rng.choice(idx, size=n)
        write = rng.random(n) < 0.5
    else:
        idx = np.concatenate([idx, idx])[: n or None]
        write = np.arange(len(idx)) < len(idx) // 2
    digits = labels[idx]
    other = (digits + rng.integers(1, 10, size=len(idx))) % 10
    shown = np.where(rng.random(len(idx)) < 0.5, digits, other)
    x_img = images[idx]
    if split == "train":
        x_img = shift(x_img, rng)
    text, targets = examples(digits, write, shown)
    return (torch.from_numpy(np.ascontiguousarray(x_img[:, None])), torch.from_numpy(text)), torch.from_numpy(
        targets
    )


def stream_configs(m: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """(vision stream, text stream) configs from one [model] section: the same blocks and loop settings."""
    vision = dataclasses.replace(vision_model_config(m, IMAGE), logit_softcap=None)
    return vision, stream_config(m, causal=True, vocab_size=VOCAB, max_seq_len=IMAGE.tokens + TEXT_LEN)


class TwoStreamModel(nn.Module):
    """Vision stream (patches → looped encoder) → bridge → prefix of the text stream (a causal looped LM)."""

    streams = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        vcfg, self.cfg = stream_configs(cfg)
        self.patch = nn.Linear(IMAGE.patch_size, vcfg.width)
        self.pos = nn.Parameter(torch.zeros(IMAGE.tokens, vcfg.width))
        self.vision = LoopedLM(vcfg)
        del self.vision.embed  # the patches are its embedding
        self.vision.head = nn.Identity()  # its output is the normed final state
        self.bridge = nn.Linear(vcfg.width, self.cfg.width, bias=False)
        self.text = LoopedLM(self.cfg)
        std = self.cfg.resolved_init_std
        nn.init.trunc_normal_(self.pos, std=std, a=-3 * std, b=3 * std)

    def forward(
        self,
        x: tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor | None = None,
        loops: tuple | list | int | None = None,
        backprop_loops: int | None = None,
    ) -> LoopedOutput:
        """x: (images (B, 1, 8, 8), text (B, L)); loops: (vision loops, text loops), each an int or (B,), or
        one value for both. Returns the text stream's logits (B, L, VOCAB)."""
        images, text = x
        v_loops, t_loops = loops if isinstance(loops, tuple | list) else (loops, loops)
        e = self.patch(patchify(images, IMAGE.patch)) + self.pos
        seen = self.vision(None, loops=v_loops, backprop_loops=backprop_loops, embeds=e).logits
        # the vision readout comes back in float32 (as logits do); the bridge may be bfloat16 (`--dtype`)
        prefix = self.bridge(seen.to(self.bridge.weight.dtype))
        embeds = torch.cat([prefix, self.text.embed(text)], dim=1)
        out = self.text(None, loops=t_loops, backprop_loops=backprop_loops, embeds=embeds)
        logits = out.logits[:, prefix.shape[1] :]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return LoopedOutput(logits=logits, loss=loss, loops=out.loops, state_norms=out.state_norms)

    def constrain_(self) -> dict[str, float]:
        return {**self.vision.constrain_(), **self.text.constrain_()}


@torch.no_grad()
def evaluate_multimodal(
    model: TwoStreamModel, vision_loops: list[int], text_loops: list[int]
) -> dict[str, dict[int, dict[int, float]]]:
    """Test exact match on a grid: {"write" | "read": {vision loops: {text loops: accuracy}}}."""
    model.eval()
    (images, text), y = batch("test", None, seed=0)
    weight = next(model.parameters())  # run where the model is
    images, text, y = images.to(weight.device, weight.dtype), text.to(weight.device), y.to(weight.device)
    write = text[:, 0] == WRITE
    out: dict[str, dict[int, dict[int, float]]] = {"write": {}, "read": {}}
    for tv in vision_loops:
        for kind in out:
            out[kind][tv] = {}
        for tt in text_loops:
            logits = model((images, text), loops=(tv, tt)).logits
            ok = solved(logits, y)
            out["write"][tv][tt] = float(ok[write].float().mean())
            out["read"][tv][tt] = float(ok[~write].float().mean())
    return out
