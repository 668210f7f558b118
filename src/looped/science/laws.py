"""Scaling laws and their fitting: Parcae's test-time, training and unified laws (arXiv 2604.12946), a robust
fit, bootstrap intervals, leave-one-out error and compute-optimal predictions.

All three laws share one shape, L = E + Σ_k C_k·exp(−e_k·u_k), with u_k a feature of the point:
T for the test-time law, log N and log D for the power laws (N^−a = exp(−a·log N)), T/μ for the unified
law's loop term. One fitting routine therefore serves them all: Huber loss on log residuals, many starts
from a grid of exponents (the offset and amplitudes of each start solved by non-negative least squares),
the best few refined by L-BFGS-B with the exact gradient, the lowest objective kept.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np

# Residuals are log(predicted) − log(measured), i.e. relative errors, so runs at high and low loss weigh
# alike; Huber rather than squares so one diverged or mis-logged run cannot drag the exponents. Huber with
# δ = 1e-3 on log loss, L-BFGS from a grid of starts, is Chinchilla's fit (arXiv 2203.15556, approach 3).
HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (1e-4, 10.0)  # every exponent (a, b, x, y, z) is kept positive and finite
LEVEL = 0.95


def _huber(r: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ Huber(r) with δ = HUBER_DELTA (½r² inside ±δ, δ·|r| − ½δ² outside) and its derivative per residual."""
    inside = np.abs(r) <= HUBER_DELTA
    value = np.where(inside, 0.5 * r * r, HUBER_DELTA * np.abs(r) - 0.5 * HUBER_DELTA**2).sum()
    return float(value), np.where(inside, r, HUBER_DELTA * np.sign(r))


@dataclass(frozen=True)
class Law:
    """L = offset + Σ_k C_k·exp(−e_k·u_k); fields are the offset then (C_k, e_k) pairs, in order."""

    formula: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]  # the record keys predict() reads
    exponent_grid: ClassVar[tuple[tuple[float, ...], ...]]  # starting exponents, one tuple per term

    @staticmethod
    def _features(c: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def params(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.names()}

    @classmethod
    def _u(cls, columns: Mapping[str, object]) -> np.ndarray:
        missing = [k for k in cls.inputs if k not in columns]
        if missing:
            raise KeyError(f"{cls.__name__} needs {', '.join(missing)}")
        arrays = np.broadcast_arrays(*(np.asarray(columns[k], float) for k in cls.inputs))
        c = dict(zip(cls.inputs, arrays, strict=True))
        return np.stack(cls._features(c), axis=-1)  # (..., K)

    def predict(self, **columns) -> np.ndarray | float:
        """Predicted loss; keyword arrays named like the results.jsonl keys (extra keys are ignored)."""
        v = np.array(list(self.params.values()))
        u = self._u(columns)
        out = v[0] + sum(v[1 + 2 * k] * np.exp(-v[2 + 2 * k] * u[..., k]) for k in range(u.shape[-1]))
        return float(out) if np.ndim(out) == 0 else out

    @classmethod
    def fit(
        cls,
        columns: Mapping[str, object],
        loss: Sequence[float] | np.ndarray,
        starts: int = 6,
        init: Law | None = None,
    ) -> Self:
        """Huber fit on log loss; from the best `starts` points of the exponent grid, or from `init` alone.

        Internally each amplitude is the term's size at the mean feature, c_k = log C_k − e_k·ū_k, which
        takes away most of the correlation between C_k and e_k (log N is ~18, so a small change of the
        exponent is a large change of log C). Constraints: offset ≥ 0, amplitudes > 0 (fitted as logs),
        exponents in EXPONENT_BOUNDS, so every term decreases along its feature.
        """
        from scipy.optimize import minimize, nnls

        u = cls._u(columns)
        y = np.asarray(loss, float)
        n_params = len(cls.names())
        if u.ndim != 2 or len(y) != len(u):
            raise ValueError(f"{cls.__name__}: loss and inputs have different lengths")
        if len(y) < n_params:
            raise ValueError(f"{cls.__name__} has {n_params} parameters but only {len(y)} points")
        ref = u.mean(axis=0)
        du = u - ref  # (n, K)
        bounds = [(0.0, None)] + [(-60.0, 60.0), EXPONENT_BOUNDS] * du.shape[1]
        lo, hi = (np.array([b[i] if b[i] is not None else np.inf for b in bounds]) for i in (0, 1))
        log_y = np.log(y)

        def objective(theta):  # Huber of the log residuals, and its gradient
            t = np.exp(theta[1::2] - theta[2::2] * du)  # (n, K): each term of each point
            pred = theta[0] + t.sum(axis=1)
            value, psi = _huber(np.log(pred) - log_y)
            w = (psi / pred)[:, None]
            grad = np.empty(n_params)
            grad[0], grad[1::2], grad[2::2] = w.sum(), (w * t).sum(axis=0), -(w * du * t).sum(axis=0)
            return value, grad

        if init is not None:
            v = np.array(list(init.params.values()))
            with np.errstate(divide="ignore"):
                v[1::2] = np.log(v[1::2]) - v[2::2] * ref
            candidates = [np.clip(v, lo, hi)]
        else:
            floor = 1e-6 * float(y.mean())
            scored = []
            for exps in itertools.product(*cls.exponent_grid):
                e = np.array(exps)
                coef, _ = nnls(np.column_stack([np.ones(len(y)), np.exp(-e * du)]), y)
                theta = np.empty(n_params)
                theta[0], theta[1::2], theta[2::2] = coef[0], np.log(np.maximum(coef[1:], floor)), e
                theta = np.clip(theta, lo, hi)
                scored.append((objective(theta)[0], theta))
            scored.sort(key=lambda s: s[0])
            candidates = [theta for _, theta in scored[:starts]]
        best = None
        for theta0 in candidates:
            res = minimize(
                objective,
                theta0,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-12},
            )
            if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
                best = res
        if best is None:
            raise ValueError(f"{cls.__name__}: no start converged to finite parameters")
        v = best.x.copy()
        v[1::2] = np.exp(v[1::2] + v[2::2] * ref)
        return cls(*(float(x) for x in v))


@dataclass(frozen=True)
class TestTimeLaw(Law):
    """Parcae's test-time law for one run: L(T) = L∞ + Z·exp(−z·T) (it plateaus near T ≈ μ)."""

    __test__ = False  # a library class, not a test case for pytest to collect

    L_inf: float
    Z: float
    z: float
    formula = "L(T) = L_inf + Z·exp(−z·T)"
    inputs = ("loops",)
    exponent_grid = ((0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2),)

    @staticmethod
    def _features(c):
        return [c["loops"]]


@dataclass(frozen=True)
class TrainingLaw(Law):
    """Parcae's training law over runs: L = E + A·N^−a + B·D^−b, N = unrolled_params N(μ), D = tokens.

    Each run contributes its loss at T = round(μ) (the nearest evaluated T when that one is missing),
    where a looped model's test-time curve has reached its plateau.
    """

    E: float
    A: float
    a: float
    B: float
    b: float
    formula = "L = E + A·N^−a + B·D^−b"
    inputs = ("unrolled_params", "tokens")
    exponent_grid = ((0.1, 0.2, 0.35, 0.5, 0.75, 1.0),) * 2

    @staticmethod
    def _features(c):
        return [np.log(c["unrolled_params"]), np.log(c["tokens"])]


@dataclass(frozen=True)
class UnifiedLaw(Law):
    """Parcae's unified law over every record: L = E + X·N^−x + Y·D^−y + Z·exp(−z·T/μ)."""

    E: float
    X: float
    x: float
    Y: float
    y: float
    Z: float
    z: float
    formula = "L = E + X·N^−x + Y·D^−y + Z·exp(−z·T/μ)"
    inputs = ("unrolled_params", "tokens", "loops", "mean_loops")
    exponent_grid = ((0.1, 0.25, 0.5, 0.75, 1.0),) * 2 + ((0.25, 0.5, 1.0, 2.0, 4.0),)

    @staticmethod
    def _features(c):
        return [np.log(c["unrolled_params"]), np.log(c["tokens"]), c["loops"] / c["mean_loops"]]


# ---------------------------------------------------------------------------------------------- uncertainty


def _take(columns: Mapping[str, object], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, float)[idx] for k, v in columns.items()}


def group_indices(n: int, groups: Sequence | np.ndarray | None) -> list[np.ndarray]:
    labels = np.arange(n) if groups is None else np.asarray(groups)
    return [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]


def bootstrap(
    law: type[Law],
    columns: Mapping[str, object],
    loss: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    samples: int = 200,
    seed: int = 0,
    init: Law | None = None,
    level: float = LEVEL,
) -> dict:
    """Percentile confidence intervals of a law's parameters over resamples of groups (runs) with replacement.

    groups: a label per point (e.g. run names); None resamples single points. Each resample is fitted
    from `init` (default: the full fit), which keeps 200 resamples to a few seconds; a resample with
    fewer distinct points than parameters counts as failed.
    """
    y = np.asarray(loss, float)
    init = init or law.fit(columns, y)
    parts = group_indices(len(y), groups)
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(samples):
        idx = np.concatenate([parts[i] for i in rng.integers(0, len(parts), len(parts))])
        if len(np.unique(idx)) < len(law.names()):
            failed += 1
            continue
        try:
            draws.append(list(law.fit(_take(columns, idx), y[idx], init=init).params.values()))
        except ValueError:
            failed += 1
    out: dict = {"samples": len(draws), "failed": failed, "level": level, "ci": None}
    if len(draws) >= 2:
        q = np.percentile(np.array(draws), [50 * (1 - level), 50 * (1 + level)], axis=0)
        out["ci"] = {name: [float(q[0, i]), float(q[1, i])] for i, name in enumerate(law.names())}
    return out


def leave_one_out(
    law: type[Law],
    columns: Mapping[str, object],
    loss: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    starts: int = 2,
) -> dict:
    """Relative error |predicted − measured| / measured of held-out points, leaving one group out at a time.

    Every fold is fitted afresh from the exponent grid, so it never sees its held-out points.
    """
    y = np.asarray(loss, float)
    errors, failed = [], 0
    for held in group_indices(len(y), groups):
        keep = np.setdiff1d(np.arange(len(y)), held)
        try:
            fitted = law.fit(_take(columns, keep), y[keep], starts=starts)
        except ValueError:
            failed += 1
            continue
        pred = np.atleast_1d(fitted.predict(**_take(columns, held)))
        errors.extend(np.abs(pred - y[held]) / y[held])
    if not errors:
        raise ValueError(f"no leave-one-out fold of {law.__name__} could be fitted")
    return {
        "folds": len(group_indices(len(y), groups)) - failed,
        "failed": failed,
        "mean_rel_error": float(np.mean(errors)),
        "max_rel_error": float(np.max(errors)),
    }


# ---------------------------------------------------------------------------------------------- compute-optimal


def compute_optimal(
    law: UnifiedLaw,
    flops_budget: float,
    flops_per_token_fn: Callable[[int], float],
    unrolled_params_fn: Callable[[int], float],
    mean_loops_grid: Sequence[int] = range(1, 65),
) -> dict:
    """The mean loops μ* and tokens D* that minimise the unified law's loss at T = μ for a FLOP budget.

    Training FLOPs are flops_per_token_fn(μ)·D. The predicted loss falls with D at every μ, so the best
    continuous D spends the whole budget, D = budget / flops_per_token_fn(μ); μ is searched over the grid.
    """
    mus = np.array(list(mean_loops_grid), dtype=float)
    fpt = np.array([flops_per_token_fn(int(m)) for m in mus], dtype=float)
    n = np.array([unrolled_params_fn(int(m)) for m in mus], dtype=float)
    tokens = flops_budget / fpt
    losses = np.asarray(law.predict(unrolled_params=n, tokens=tokens, loops=mus, mean_loops=mus))
    i = int(np.argmin(losses))
    return {
        "flops": float(flops_budget),
        "mean_loops": int(mus[i]),
        "tokens": float(tokens[i]),
        "unrolled_params": float(n[i]),
        "flops_per_token": float(fpt[i]),
        "loss": float(losses[i]),
        "at_grid_edge": i in (0, len(mus) - 1),
    }


def compute_optimal_scaling(
    law: UnifiedLaw,
    budgets: Sequence[float],
    flops_per_token_fn: Callable[[int], float],
    unrolled_params_fn: Callable[[int], float],
    mean_loops_grid: Sequence[int] = range(1, 65),
) -> dict:
    """compute_optimal at each budget, and the exponents of μ* ∝ C^α and D* ∝ C^β.

    The exponents are least-squares slopes in log-log space over the budgets whose μ* is inside the grid
    (a μ* pinned at 1 or at the largest μ says nothing about the growth); None with fewer than two.
    """
    points = [
        compute_optimal(law, c, flops_per_token_fn, unrolled_params_fn, mean_loops_grid) for c in budgets
    ]
    inside = [p for p in points if not p["at_grid_edge"]]
    exponents = None
    if len({p["flops"] for p in inside}) >= 2:
        log_c = np.log([p["flops"] for p in inside])
        exponents = {
            key: float(np.polyfit(log_c, np.log([p[key] for p in inside]), 1)[0])
            for key in ("mean_loops", "tokens")
        }
    return {"points": points, "exponents": exponents, "exponent_budgets": len(inside)}
