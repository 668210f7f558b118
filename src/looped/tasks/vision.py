"""A looped vision transformer (patches → prelude → core × T → coda → class head) on data that needs no
download: scikit-learn's bundled 8 × 8 handwritten digits, and short clips of those digits moving across a
larger canvas.

- digits: 1,797 grey 8 × 8 images (values 0..16, scaled to [0, 1]) of the digits 0–9; 2 × 2 patches make 16
  tokens. A fixed seeded split keeps 360 images for testing; training images are shifted by up to a pixel
  at random each time they are drawn.
- moving_digits: FRAMES frames of a 12 × 12 canvas across which a digit moves one pixel per frame, right,
  left, down or up; the class is (digit, direction), 40 classes, so a model must look across frames. 4 × 4
  patches per frame make 36 tokens. Training clips are drawn afresh (start and direction at random) from the
  training images; test clips come from the test images with a fixed seed.

The body is the same LoopedLM as for text and tasks (an encoder: model.causal = false), fed patch embeddings
plus a learned position per token instead of token ids. Its head gives class logits per token, averaged over
tokens (the same as a linear head on the mean of the normed states).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from looped.config import ConfigError, ModelConfig
from looped.model.lm import LoopedLM, LoopedOutput

CANVAS, FRAMES = 12, 4
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (row, column) steps: right, left, down, up
DIRECTION_NAMES = ("right", "left", "down", "up")
TEST_IMAGES = 360


@functools.cache
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "the vision tasks read scikit-learn's bundled digits: pip install 'looped[vision]'"
        ) from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices of the fixed train or test split of the digits (a seeded permutation; 360 for testing)."""
    n = len(digit_images()[1])
    order = np.random.default_rng(1234).permutation(n)
    if split == "test":
        return np.sort(order[:TEST_IMAGES])
    if split == "train":
        return np.sort(order[TEST_IMAGES:])
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def shift(images: np.ndarray, rng: np.random.Generator, most: int = 1) -> np.ndarray:
    """Each image moved by up to `most` pixels each way (zeros fill in): a cheap augmentation."""
    out = np.zeros_like(images)
    h, w = images.shape[-2:]
    for k, (dr, dc) in enumerate(rng.integers(-most, most + 1, size=(len(images), 2))):
        src = images[k, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
        out[k, max(0, dr) : max(0, dr) + src.shape[0], max(0, dc) : max(0, dc) + src.shape[1]] = src
    return out


def make_clips(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A clip per image: (clips (n, FRAMES, CANVAS, CANVAS), directions (n,)). The digit starts where its
    whole path stays on the canvas and moves one pixel per frame."""
    n, side = len(images), images.shape[-1]
    room, travel = CANVAS - side, FRAMES - 1
    clips = np.zeros((n, FRAMES, CANVAS, CANVAS), dtype=np.float32)
    direction = rng.integers(0, len(DIRECTIONS), size=n)
    for k in range(n):
        dr, dc = DIRECTIONS[direction[k]]
        # the moving axis starts where the path fits; the other anywhere on the canvas
        r0 = rng.integers(max(0, -dr * travel), room - max(0, dr * travel) + 1)
        c0 = rng.integers(max(0, -dc * travel), room - max(0, dc * travel) + 1)
        for f in range(FRAMES):
            r, c = r0 + dr * f, c0 + dc * f
            clips[k, f, r : r + side, c : c + side] = images[k]
    return clips, direction


@dataclass(frozen=True)
class VisionTask:
    """A vision data set: frames × height × width inputs cut into patches of (frames, height, width)."""

    name: str
    classes: int
    shape: tuple[int, int, int]
    patch: tuple[int, int, int]

    @property
    def tokens(self) -> int:
        return int(np.prod([s // p for s, p in zip(self.shape, self.patch, strict=True)]))

    @property
    def patch_size(self) -> int:
        return int(np.prod(self.patch))

    def batch(self, split: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (n, frames, H, W) float32, labels (n,)). Training draws n images with replacement and
        augments them; the test split is fixed (n = None: all of it)."""
        images, labels = digit_images()
        idx = split_indices(split)
        rng = np.random.default_rng([seed, len(self.name)])
        if split == "train":
            idx = rng.choice(idx, size=n)
        elif n is not None:
            idx = idx[:n]
        x, y = images[idx], labels[idx]
        if self.name == "digits":
            if split == "train":
                x = shift(x, rng)
            x = x[:, None]
        else:
            x, direction = make_clips(x, rng)
            y = y * len(DIRECTIONS) + direction
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


VISION_TASKS: dict[str, VisionTask] = {
    "digits": VisionTask("digits", 10, (1, 8, 8), (1, 2, 2)),
    "moving_digits": VisionTask("moving_digits", 10 * len(DIRECTIONS), (FRAMES, CANVAS, CANVAS), (1, 4, 4)),
}


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, F, H, W) → (B, tokens, pf·ph·pw): patches in frame, row, column order."""
    B, Fr, H, W = x.shape
    pf, ph, pw = patch
    x = x.reshape(B, Fr // pf, pf, H // ph, ph, W // pw, pw)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, pf * ph * pw)


def stream_config(m: ModelConfig, causal: bool, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """`m` as one stream of a vision or two-stream model: fed embeddings (no value embeddings, nothing tied),
    full attention, `vocab_size` head rows."""
    return dataclasses.replace(
        m,
        causal=causal,
        vocab_size=vocab_size,
        tie_embeddings=False,
        value_embeds=False,
        value_embed_layers=None,
        max_seq_len=max_seq_len,
        attn_window=None,
    )


def vision_model_config(m: ModelConfig, task: VisionTask) -> ModelConfig:
    """The body's config for `task`: an encoder with a class per head row, as long as the task's tokens."""
    return stream_config(m, causal=False, vocab_size=task.classes, max_seq_len=task.tokens)


class LoopedViT(nn.Module):
    """Patch embedding + learned positions → LoopedLM body (prelude, core × T, coda) → mean class logits."""

    def __init__(self, cfg: ModelConfig, task: VisionTask) -> None:
        super().__init__()
        self.task = task
        self.cfg = vision_model_config(cfg, task)
        self.patch = nn.Linear(task.patch_size, self.cfg.width)
        self.pos = nn.Parameter(torch.zeros(task.tokens, self.cfg.width))
        self.body = LoopedLM(self.cfg)
        del self.body.embed  # the patches are the embedding
        std = self.cfg.resolved_init_std
        nn.init.trunc_normal_(self.pos, std=std, a=-3 * std, b=3 * std)

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        loops: int | torch.Tensor | None = None,
        backprop_loops: int | None = None,
    ) -> LoopedOutput:
        """x: (B, frames, H, W) in [0, 1]; labels: (B,) classes. Returns logits (B, classes)."""
        if tuple(x.shape[1:]) != self.task.shape:
            raise ValueError(f"{self.task.name}: inputs of shape {self.task.shape}, got {tuple(x.shape[1:])}")
        e = self.patch(patchify(x, self.task.patch)) + self.pos
        out = self.body(None, loops=loops, backprop_loops=backprop_loops, embeds=e)
        logits = out.logits.mean(dim=1)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return LoopedOutput(logits=logits, loss=loss, loops=out.loops, state_norms=out.state_norms)

    def constrain_(self) -> dict[str, float]:
        return self.body.constrain_()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def evaluate_vision(model: LoopedViT, loops: list[int], batch: int = 256) -> dict[str, dict[int, float]]:
    """Test accuracy at each loop count: {"test": {loops: accuracy}}."""
    model.eval()
    x, y = model.task.batch("test", None, seed=0)
    weight = next(model.parameters())
    x, y = x.to(weight.device, weight.dtype), y.to(weight.device)  # runs where the model is
    row = {}
    for t in loops:
        right = sum(
            int((model(x[i : i + batch], loops=t).logits.argmax(-1) == y[i : i + batch]).sum())
            for i in range(0, len(y), batch)
        )
        row[t] = right / len(y)
    return {"test": row}
