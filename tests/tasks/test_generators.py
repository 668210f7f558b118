"""The task generators: deterministic per seed, and every target checked against a plain solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from looped.tasks.generators import GOAL, IGNORE, QUERY, START, TASKS, WALL, get_task


@pytest.mark.parametrize("name,size", [("prefix_sums", 17), ("parity", 9), ("addition", 6), ("mazes", 9)])
def test_deterministic_per_seed_and_size(name, size):
    task = get_task(name)
    x1, y1 = task.batch(8, size, seed=3)
    x2, y2 = task.batch(8, size, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape and x1.dtype == torch.long
    assert not torch.equal(task.batch(8, size, seed=4)[0], x1)
    assert int(x1.max()) < task.vocab_size and int(y1[y1 != IGNORE].max()) < task.classes


def test_prefix_sums_are_running_parities():
    x, y = get_task("prefix_sums").batch(16, 40, seed=0)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        acc = 0
        for bit, t in zip(row, target, strict=True):
            acc ^= bit
            assert t == acc


def test_parity_is_asked_at_the_query_token():
    x, y = get_task("parity").batch(32, 21, seed=1)
    assert (x[:, -1] == QUERY).all() and (y[:, :-1] == IGNORE).all()
    assert y[:, -1].tolist() == [sum(r[:-1]) % 2 for r in x.tolist()]


def test_addition_matches_python_integers():
    n = 12
    x, y = get_task("addition").batch(64, n, seed=2)
    assert x.shape == (64, 3 * n + 1)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        a = sum(bit << i for i, bit in enumerate(row[0 : 3 * n : 3]))
        b = sum(bit << i for i, bit in enumerate(row[1 : 3 * n : 3]))
        asked = [j for j, t in enumerate(target) if t != IGNORE]
        assert asked == [*range(2, 3 * n, 3), 3 * n] and all(row[j] == QUERY for j in asked)
        assert sum(target[j] << i for i, j in enumerate(asked)) == a + b


def distances(open_cells: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """Shortest-path lengths by repeated relaxation (Bellman-Ford style), independent of the generator's BFS."""
    side = open_cells.shape[0]
    inf = side * side + 1
    d = np.full(open_cells.shape, inf)
    d[start] = 0
    changed = True
    while changed:
        changed = False
        for r in range(side):
            for c in range(side):
                if not open_cells[r, c]:
                    continue
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < side and 0 <= cc < side and d[rr, cc] + 1 < d[r, c]:
                        d[r, c] = d[rr, cc] + 1
                        changed = True
    return d


@pytest.mark.parametrize("side", [5, 7, 15])
def test_mazes_are_perfect_and_the_target_is_the_shortest_path(side):
    x, y = get_task("mazes").batch(6, side, seed=5)
    for flat, target in zip(x.numpy(), y.numpy(), strict=True):
        grid, path = flat.reshape(side, side), target.reshape(side, side)
        open_cells = grid != WALL
        assert grid[1, 1] == START and grid[side - 2, side - 2] == GOAL
        assert not open_cells[0].any() and not open_cells[-1].any()  # walled border
        assert (path[~open_cells] == IGNORE).all() and set(np.unique(path[open_cells])) <= {0, 1}
        # a perfect maze is a tree: open cells − 1 = adjacent open pairs, so one path joins any two cells
        pairs = (open_cells[1:] & open_cells[:-1]).sum() + (open_cells[:, 1:] & open_cells[:, :-1]).sum()
        assert pairs == open_cells.sum() - 1
        d = distances(open_cells, (1, 1))
        on = path == 1
        assert on.sum() == d[side - 2, side - 2] + 1  # the path's cells are exactly a shortest path
        assert on[1, 1] and on[side - 2, side - 2]
        ends = {(1, 1), (side - 2, side - 2)}
        for r, c in zip(*np.nonzero(on), strict=True):  # a chain: ends have one path neighbour, others two
            around = sum(on[rr, cc] for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)))
            assert around == (1 if (r, c) in ends else 2)


def test_bad_sizes_and_names():
    with pytest.raises(ValueError, match="odd"):
        get_task("mazes").batch(1, 8, seed=0)
    with pytest.raises(ValueError, match="≥ 5"):
        get_task("mazes").batch(1, 3, seed=0)
    with pytest.raises(ValueError, match="≥ 1"):
        get_task("parity").batch(1, 0, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")
    assert set(TASKS) == {"prefix_sums", "parity", "addition", "mazes"}
