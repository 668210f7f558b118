"""Seeded generators of easy-to-hard algorithmic tasks, for looped models that should solve larger problems
than they were trained on by running more loops: prefix sums, parity, binary addition and mazes.

Every task gives a batch of (inputs, targets) as LongTensors of one shape: a token per position and a target
class per position, IGNORE (-100) where nothing is asked, so that one non-causal encoder with a per-position
head serves all of them. The problem size is an argument of every call, so train and test sizes are
independent, and a batch is a function of (seed, size, n) alone.

- prefix_sums (Bansal et al. 2022): bits x₁…xₙ → the running parity x₁ ⊕ … ⊕ xᵢ at every position.
- parity (Fan et al. 2024): bits → the parity of all of them, asked at a final query token.
- addition: a and b as n little-endian bits, interleaved as a₀ b₀ ? a₁ b₁ ? … ?, → bit i of a + b at the
  query after aᵢ bᵢ, and the carry out at the last query.
- mazes (Bansal et al. 2022): a random depth-first-search maze on an s × s grid (s odd), start in the top-left
  cell and goal in the bottom-right → 1 on the cells of the shortest path, 0 on other open cells.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100

# tokens shared by the bit tasks
ZERO, ONE, SEP, QUERY = 0, 1, 2, 3
# maze cells
WALL, OPEN, START, GOAL = 0, 1, 2, 3


@dataclass(frozen=True)
class Task:
    """A task: its input vocabulary, its output classes and a batch maker `make(n, size, rng)`."""

    name: str
    vocab_size: int
    classes: int
    make: Callable[[int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    size_name: str  # what `size` counts, for tables: "bits", "digits", "cells per side"

    def batch(self, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n problems of this size: (inputs, targets), both (n, L) LongTensors; the same for the same seed."""
        if n < 1:
            raise ValueError(f"{self.name}: need at least one problem, got n = {n}")
        check_size(self, size)
        rng = np.random.default_rng([seed, size, zlib.crc32(self.name.encode())])
        x, y = self.make(n, size, rng)
        return torch.from_numpy(x).long(), torch.from_numpy(y).long()


def solved(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) whether each example's every asked position (target ≠ IGNORE) is predicted right."""
    return ((logits.argmax(-1) == targets) | (targets == IGNORE)).all(dim=1)


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of examples solved (`solved`)."""
    return solved(logits, targets).float().mean().item()


def check_size(task: Task, size: int) -> None:
    if task.name == "mazes":
        if size < 5 or size % 2 == 0:
            raise ValueError(f"mazes: the side must be an odd number ≥ 5 (start and goal apart), got {size}")
    elif size < 1:
        raise ValueError(f"{task.name}: the size must be ≥ 1 {task.size_name}, got {size}")


def _bits(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 2, size=(n, size), dtype=np.int64)


def make_prefix_sums(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = _bits(rng, n, size)
    return x, np.cumsum(x, axis=1) % 2


def make_parity(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = _bits(rng, n, size)
    inputs = np.concatenate([x, np.full((n, 1), QUERY)], axis=1)
    targets = np.full_like(inputs, IGNORE)
    targets[:, -1] = x.sum(axis=1) % 2
    return inputs, targets


def make_addition(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a, b = _bits(rng, n, size), _bits(rng, n, size)
    total = np.zeros((n, size + 1), dtype=np.int64)  # little-endian ripple carry
    carry = np.zeros(n, dtype=np.int64)
    for i in range(size):
        s = a[:, i] + b[:, i] + carry
        total[:, i], carry = s % 2, s // 2
    total[:, size] = carry
    # interleaved, so that bit i of the sum sits next to bits i of a and b at every size
    inputs = np.full((n, 3 * size + 1), QUERY, dtype=np.int64)
    inputs[:, 0 : 3 * size : 3], inputs[:, 1 : 3 * size : 3] = a, b
    targets = np.full_like(inputs, IGNORE)
    targets[:, 2 : 3 * size : 3], targets[:, 3 * size] = total[:, :size], total[:, size]
    return inputs, targets


def maze(side: int, rng: np.random.Generator) -> np.ndarray:
    """A perfect maze (one path between any two open cells) on a side × side grid, by randomized depth-first
    search over the cells at odd coordinates; the border is wall. (side, side) array of WALL / OPEN."""
    grid = np.full((side, side), WALL, dtype=np.int64)
    cells = (side - 1) // 2  # rooms per side; room (i, j) sits at (2i + 1, 2j + 1)
    if cells == 0:
        return grid
    seen = np.zeros((cells, cells), dtype=bool)
    stack = [(0, 0)]
    seen[0, 0] = True
    grid[1, 1] = OPEN
    while stack:
        i, j = stack[-1]
        nexts = [
            (i + di, j + dj)
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if 0 <= i + di < cells and 0 <= j + dj < cells and not seen[i + di, j + dj]
        ]
        if not nexts:
            stack.pop()
            continue
        ni, nj = nexts[rng.integers(len(nexts))]
        seen[ni, nj] = True
        grid[2 * ni + 1, 2 * nj + 1] = OPEN
        grid[i + ni + 1, j + nj + 1] = OPEN  # the wall between the two rooms
        stack.append((ni, nj))
    return grid


def shortest_path(grid: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells of a shortest path from start to goal through non-wall cells (breadth-first search)."""
    side = grid.shape[0]
    prev: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        r, c = cell
        for nxt in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nxt[0] < side and 0 <= nxt[1] < side and grid[nxt] != WALL and nxt not in prev:
                prev[nxt] = cell
                queue.append(nxt)
    if goal not in prev:
        raise ValueError("the goal cannot be reached from the start")
    path, cell = [], goal
    while cell is not None:
        path.append(cell)
        cell = prev[cell]
    return path[::-1]


def make_mazes(n: int, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.empty((n, side * side), dtype=np.int64)
    targets = np.empty((n, side * side), dtype=np.int64)
    start, goal = (1, 1), (side - 2, side - 2)
    for k in range(n):
        grid = maze(side, rng)
        on_path = np.zeros_like(grid)
        for cell in shortest_path(grid, start, goal):
            on_path[cell] = 1
        target = np.where(grid == WALL, IGNORE, on_path)
        grid[start], grid[goal] = START, GOAL
        inputs[k], targets[k] = grid.ravel(), target.ravel()
    return inputs, targets


TASKS: dict[str, Task] = {
    "prefix_sums": Task("prefix_sums", 2, 2, make_prefix_sums, "bits"),
    "parity": Task("parity", 4, 2, make_parity, "bits"),
    "addition": Task("addition", 4, 2, make_addition, "bits per number"),
    "mazes": Task("mazes", 4, 2, make_mazes, "cells per side"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
