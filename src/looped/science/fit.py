"""Scaling-law fits to a sweep's results.jsonl: Parcae's test-time, training and unified laws (arXiv 2604.12946).

All three laws share one shape, L = E + Σ_k C_k·exp(−e_k·u_k), with u_k a feature of the point:
T for the test-time law, log N and log D for the power laws (N^−a = exp(−a·log N)), T/μ for the unified
law's loop term. One fitting routine therefore serves them all: Huber loss on log residuals, many starts
from a grid of exponents (the offset and amplitudes of each start solved by non-negative least squares),
the best few refined by L-BFGS-B with the exact gradient, the lowest objective kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

if TYPE_CHECKING:
    from looped.config import ModelConfig

# Residuals are log(predicted) − log(measured), i.e. relative errors, so runs at high and low loss weigh
# alike; Huber rather than squares so one diverged or mis-logged run cannot drag the exponents. Huber with
# δ = 1e-3 on log loss, L-BFGS from a grid of starts, is Chinchilla's fit (arXiv 2203.15556, approach 3).
HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (1e-4, 10.0)  # every exponent (a, b, x, y, z) is kept positive and finite
LEVEL = 0.95


class FitError(ValueError):
    """A results file that cannot be fitted as written: the message names file:line and the problem."""


# ---------------------------------------------------------------------------------------------- loading

# Required keys and their kinds: str, bool, int (an integral number), number (finite; all numbers > 0).
SCHEMA = {
    "run": "str",
    "looped": "bool",
    "mean_loops": "number",
    "loops": "int",
    "params": "number",
    "unrolled_params": "number",
    "tokens": "number",
    "flops": "number",
    "loss": "number",
}
OPTIONAL = {"seed": "int", "width": "int"}
RUN_KEYS = ("looped", "mean_loops", "params", "unrolled_params", "tokens", "flops")  # fixed per run


def _checked(rec: dict, key: str, kind: str, where: str):
    value = rec[key]
    if kind == "str" and not (isinstance(value, str) and value):
        raise FitError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise FitError(f"{where}: {key!r} must be true or false, got {value!r}")
    if kind in ("str", "bool"):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FitError(f"{where}: {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise FitError(f"{where}: {key!r} is {value} (not finite)")
    if kind == "int" and value != int(value):
        raise FitError(f"{where}: {key!r} must be an integer, got {value!r}")
    least = 1 if key in ("mean_loops", "loops") else 0
    if key in SCHEMA and (value < least if least else value <= 0):
        raise FitError(f"{where}: {key!r} must be {'≥ 1' if least else '> 0'}, got {value!r}")
    return int(value) if kind == "int" else value


def load_results(path: str | Path) -> list[dict]:
    """Read and validate a results.jsonl: one JSON object per (run, evaluated loop count); blank lines skipped.

    Required keys (see SCHEMA): run, looped, mean_loops (μ), loops (T), params, unrolled_params (N(μ)),
    tokens (D), flops, loss; optional seed and width. Raises FitError naming file:line for a line that is
    not JSON, a missing key, a wrong type, a non-finite or non-positive value, a run whose run-level keys
    change between lines, a repeated (run, loops) pair, or a file with no records.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FitError(f"{path}: cannot read: {e}") from e
    records: list[dict] = []
    first: dict[str, tuple[int, dict]] = {}
    seen: dict[tuple[str, int], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FitError(f"{where}: not JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(rec, dict):
            raise FitError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key, kind in SCHEMA.items():
            if key not in rec:
                raise FitError(f"{where}: missing key {key!r}")
            rec[key] = _checked(rec, key, kind, where)
        for key, kind in OPTIONAL.items():
            if rec.get(key) is not None:
                rec[key] = _checked(rec, key, kind, where)
        if rec["unrolled_params"] < rec["params"]:
            raise FitError(f"{where}: unrolled_params {rec['unrolled_params']} < params {rec['params']}")
        run = rec["run"]
        if run in first:
            line0, rec0 = first[run]
            for key in RUN_KEYS:
                if rec[key] != rec0[key]:
                    raise FitError(
                        f"{where}: run {run!r} has {key}={rec[key]!r} here but {rec0[key]!r} at line {line0}"
                    )
        else:
            first[run] = (number, rec)
        if (run, rec["loops"]) in seen:
            raise FitError(
                f"{where}: run {run!r} at loops={rec['loops']} again (first at line {seen[run, rec['loops']]})"
            )
        seen[run, rec["loops"]] = number
        records.append(rec)
    if not records:
        raise FitError(f"{path}: no records (the file is empty)")
    return records


def _by_run(records: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for rec in records:
        runs.setdefault(rec["run"], []).append(rec)
    return {run: sorted(recs, key=lambda r: r["loops"]) for run, recs in runs.items()}


def _nearest(recs: list[dict], target: int) -> dict:
    return min(recs, key=lambda r: (abs(r["loops"] - target), r["loops"]))


def _columns(recs: list[dict], standard_as_one: bool = False) -> dict[str, np.ndarray]:
    # A standard model runs its full depth once: as a point of the unified law it has T = μ = 1.
    def get(r: dict, key: str) -> float:
        return 1.0 if standard_as_one and not r["looped"] and key in ("loops", "mean_loops") else r[key]

    keys = ("loops", "mean_loops", "unrolled_params", "tokens", "loss")
    return {k: np.array([get(r, k) for r in recs], dtype=float) for k in keys}


def training_points(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """One record per run for the training law: the loss at T = round(μ), or at the nearest T evaluated."""
    chosen = [_nearest(recs, max(1, round(recs[0]["mean_loops"]))) for recs in _by_run(records).values()]
    return chosen, {r["run"]: r["loops"] for r in chosen}


def unified_points(records: list[dict]) -> list[dict]:
    """Every record of a looped run, and one per standard run (its loss does not depend on T)."""
    out = []
    for recs in _by_run(records).values():
        out.extend(recs if recs[0]["looped"] else [_nearest(recs, 1)])
    return out


# ---------------------------------------------------------------------------------------------- laws


def _huber(r: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ Huber(r) with δ = HUBER_DELTA (½r² inside ±δ, δ·|r| − ½δ² outside) and its derivative per residual."""
    inside = np.abs(r) <= HUBER_DELTA
    value = np.where(inside, 0.5 * r * r, HUBER_DELTA * np.abs(r) - 0.5 * HUBER_DELTA**2).sum()
    return float(value), np.where(inside, r, HUBER_DELTA * np.sign(r))


@dataclass(frozen=True)
class _Law:
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
        init: _Law | None = None,
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
class TestTimeLaw(_Law):
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
class TrainingLaw(_Law):
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
class UnifiedLaw(_Law):
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


def _group_indices(n: int, groups: Sequence | np.ndarray | None) -> list[np.ndarray]:
    labels = np.arange(n) if groups is None else np.asarray(groups)
    return [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]


def bootstrap(
    law: type[_Law],
    columns: Mapping[str, object],
    loss: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    samples: int = 200,
    seed: int = 0,
    init: _Law | None = None,
    level: float = LEVEL,
) -> dict:
    """Percentile confidence intervals of a law's parameters over resamples of groups (runs) with replacement.

    groups: a label per point (e.g. run names); None resamples single points. Each resample is fitted
    from `init` (default: the full fit), which keeps 200 resamples to a few seconds; a resample with
    fewer distinct points than parameters counts as failed.
    """
    y = np.asarray(loss, float)
    init = init or law.fit(columns, y)
    parts = _group_indices(len(y), groups)
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
    law: type[_Law],
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
    for held in _group_indices(len(y), groups):
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
        "folds": len(_group_indices(len(y), groups)) - failed,
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


def accounting_fns(cfg: ModelConfig, seq_len: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """(μ → training FLOPs per token with k = ⌈μ/2⌉ gradient loops, μ → N(μ)) from a looped ModelConfig."""
    from looped.model.accounting import flops_per_token, unrolled_params

    def fpt(mu: int) -> float:
        return flops_per_token(cfg, mu, seq_len, training=True, backprop_loops=math.ceil(mu / 2))

    return fpt, lambda mu: float(unrolled_params(cfg, mu))


def data_accounting(recs: list[dict]) -> tuple[Callable[[int], float], Callable[[int], float], float]:
    """(FLOPs per token, N(μ), core params) of one architecture, estimated from its looped runs' records.

    N(μ) = params + (μ − 1)·core, with core = (unrolled_params − params)/(round(μ) − 1), the median over
    runs with round(μ) > 1 (the sweep counts the core round(μ) times in unrolled_params).
    FLOPs per token follow the 6N rule with forward-only loops, 2·N(μ) + 4·N(⌈μ/2⌉) (every loop runs
    forward, the last ⌈μ/2⌉ also backward), scaled to the measured flops/tokens (median ratio): it keeps
    the measured attention and head costs roughly in proportion without needing the config.
    """
    params = recs[0]["params"]
    cores = [
        (r["unrolled_params"] - params) / (round(r["mean_loops"]) - 1)
        for r in recs
        if round(r["mean_loops"]) > 1
    ]
    if not cores:
        raise ValueError("no looped run with mean_loops > 1, so the core's size is unknown")
    core = float(np.median(cores))

    def n_fn(mu: float) -> float:
        return params + (mu - 1) * core

    def rule(mu: float) -> float:
        return 2 * n_fn(mu) + 4 * n_fn(math.ceil(mu / 2))

    scale = float(np.median([r["flops"] / r["tokens"] / rule(r["mean_loops"]) for r in recs]))
    return (lambda mu: scale * rule(mu)), n_fn, core


# ---------------------------------------------------------------------------------------------- the whole file


def _fit_law(
    law: type[_Law],
    recs: list[dict],
    groups: list[str] | None,
    samples: int,
    seed: int,
    skip: str | None = None,
) -> tuple[dict, _Law | None]:
    """One law's JSON entry (parameters, CIs, LOO error) and the fitted law; skipped with a reason."""
    cols = _columns(recs, standard_as_one=True)
    y = cols.pop("loss")
    n_params = len(law.names())
    entry: dict = {"formula": law.formula, "points": len(y)}
    if skip is None and len(y) < n_params:
        skip = f"{len(y)} points for {n_params} parameters"
    if skip is not None:
        return {**entry, "status": "skipped", "reason": skip}, None
    try:
        fitted = law.fit(cols, y)
    except ValueError as e:
        return {**entry, "status": "skipped", "reason": f"fit failed: {e}"}, None
    rel = np.abs(np.asarray(fitted.predict(**cols)) - y) / y
    entry.update(
        status="fitted",
        params=fitted.params,
        fit_rel_error={"mean": float(rel.mean()), "max": float(rel.max())},
    )
    n_groups = len(_group_indices(len(y), groups))
    if samples <= 0:
        entry["bootstrap"] = {"skipped": "bootstrap_samples is 0"}
    elif n_groups < 2 or len(y) <= n_params:
        entry["bootstrap"] = {
            "skipped": f"needs more points than parameters ({len(y)} for {n_params}) and two groups"
        }
    else:
        entry["bootstrap"] = bootstrap(law, cols, y, groups, samples=samples, seed=seed, init=fitted)
    largest = max(len(p) for p in _group_indices(len(y), groups))
    if n_groups < 2 or len(y) - largest < n_params:
        entry["loo"] = {"skipped": f"leaving one out leaves fewer than {n_params} points"}
    else:
        try:
            entry["loo"] = leave_one_out(law, cols, y, groups)
        except ValueError as e:
            entry["loo"] = {"skipped": str(e)}
    return entry, fitted


def _budgets(records: list[dict]) -> list[float]:
    """Whole-decade FLOP budgets from below the smallest run's to ten times the largest's."""
    lo = math.floor(math.log10(min(r["flops"] for r in records)))
    hi = math.ceil(math.log10(max(r["flops"] for r in records))) + 1
    return [10.0**k for k in range(lo, hi + 1)]


def _compute_optimal_entries(law: UnifiedLaw, records: list[dict], budgets: list[float], fns) -> dict:
    if fns is not None:
        return {
            "given": {
                "source": "flops_per_token_fn and unrolled_params_fn",
                **compute_optimal_scaling(law, budgets, *fns),
            }
        }
    out = {}
    looped = [recs[0] for recs in _by_run(records).values() if recs[0]["looped"]]
    for params in sorted({r["params"] for r in looped}):
        name = f"params={params:.4g}"
        try:
            fpt, n_fn, core = data_accounting([r for r in looped if r["params"] == params])
        except ValueError as e:
            out[name] = {"status": "skipped", "reason": str(e)}
            continue
        out[name] = {
            "status": "fitted",
            "params": params,
            "core_params": core,
            **compute_optimal_scaling(law, budgets, fpt, n_fn),
        }
    return out or {"all": {"status": "skipped", "reason": "no looped runs"}}


def fit_results(
    path: str | Path,
    out_dir: str | Path | None = None,
    bootstrap_samples: int = 200,
    seed: int = 0,
    flops_per_token_fn: Callable[[int], float] | None = None,
    unrolled_params_fn: Callable[[int], float] | None = None,
) -> dict:
    """Fit the test-time (per looped run), training and unified laws to a results.jsonl; JSON-ready.

    Args:
        path: the sweep's results.jsonl (see load_results for the keys).
        out_dir: write fit_test_time.png, fit_training.png and fit_unified.png here.
        bootstrap_samples: resamples (of runs; of points for the per-run test-time law) for 95 % intervals.
        seed: the bootstrap's seed.
        flops_per_token_fn, unrolled_params_fn: μ → training FLOPs per token and μ → N(μ) of the model to
            plan compute-optimal runs for (see accounting_fns); when absent, each looped architecture
            (grouped by params) gets them from its records (see data_accounting).

    A law without enough data is "skipped" with a reason; a malformed or empty file raises FitError.
    """
    if (flops_per_token_fn is None) != (unrolled_params_fn is None):
        raise ValueError("pass flops_per_token_fn and unrolled_params_fn together")
    records = load_results(path)
    runs = _by_run(records)
    result: dict = {
        "file": str(path),
        "records": len(records),
        "runs": len(runs),
        "huber_delta": HUBER_DELTA,
        "residuals": "log loss",
        "laws": {},
    }
    test_time, fitted_tt = {}, {}
    for run, recs in runs.items():
        skip = None if recs[0]["looped"] else "standard model: its loss does not depend on loops"
        entry, law = _fit_law(TestTimeLaw, recs, None, bootstrap_samples, seed, skip)
        test_time[run] = {"mean_loops": recs[0]["mean_loops"], **entry}
        if law is not None:
            fitted_tt[run] = law
    result["laws"]["test_time"] = {"formula": TestTimeLaw.formula, "runs": test_time}

    chosen, loops_used = training_points(records)
    skip = _run_level_gap(chosen)
    training, fitted_b = _fit_law(
        TrainingLaw, chosen, [r["run"] for r in chosen], bootstrap_samples, seed, skip
    )
    training["loops_used"] = loops_used
    result["laws"]["training"] = training

    points = unified_points(records)
    skip = _run_level_gap(points)
    if skip is None and len({r["loops"] / r["mean_loops"] for r in points if r["looped"]}) < 2:
        skip = "no looped run evaluated at two values of T/μ, so Z and z cannot be fitted"
    unified, fitted_c = _fit_law(
        UnifiedLaw, points, [r["run"] for r in points], bootstrap_samples, seed, skip
    )
    result["laws"]["unified"] = unified

    if fitted_c is None:
        result["compute_optimal"] = {"all": {"status": "skipped", "reason": "the unified law was not fitted"}}
    else:
        fns = None if flops_per_token_fn is None else (flops_per_token_fn, unrolled_params_fn)
        result["compute_optimal"] = _compute_optimal_entries(fitted_c, records, _budgets(records), fns)

    if out_dir is not None:
        out = Path(out_dir)
        from looped.science.plots import plot_fits

        result["plots"] = [
            str(p) for p in plot_fits(runs, fitted_tt, chosen, fitted_b, points, fitted_c, out)
        ]
    return result


def _run_level_gap(recs: list[dict]) -> str | None:
    """Why E + A·N^−a + B·D^−b cannot be fitted to these runs, or None: its five parameters are seen only
    through each run's (N, D), so it needs five distinct pairs and at least two values of each."""
    pairs = {(r["unrolled_params"], r["tokens"]) for r in recs}
    if len(pairs) < 5:
        return f"needs at least 5 runs with distinct (unrolled_params, tokens), has {len(pairs)}"
    for key in ("unrolled_params", "tokens"):
        if len({r[key] for r in recs}) < 2:
            return f"every run has the same {key}, so its term cannot be fitted"
    return None


def _ci_text(entry: dict, name: str) -> str:
    ci = (entry.get("bootstrap") or {}).get("ci")
    return f"[{ci[name][0]:.4g}, {ci[name][1]:.4g}]" if ci else "—"


def _loo_text(entry: dict) -> str:
    loo = entry.get("loo", {})
    if "mean_rel_error" not in loo:
        return "LOO: " + loo.get("skipped", "—")
    return f"LOO rel. error: mean {100 * loo['mean_rel_error']:.2f} %, max {100 * loo['max_rel_error']:.2f} % ({loo['folds']} folds)"


def format_fit(result: dict) -> str:
    """The fits as readable tables: parameters with 95 % intervals, errors, compute-optimal predictions."""
    lines = [
        f"{result['file']}: {result['records']} records, {result['runs']} runs "
        f"(Huber δ = {result['huber_delta']} on {result['residuals']} residuals)"
    ]
    tt = result["laws"]["test_time"]
    lines += ["", f"test-time law per run: {tt['formula']}"]
    for run, e in tt["runs"].items():
        if e["status"] != "fitted":
            lines.append(f"  {run} (μ {e['mean_loops']:g}): skipped, {e['reason']}")
            continue
        params = "  ".join(f"{k} {v:.4g} {_ci_text(e, k)}" for k, v in e["params"].items())
        lines.append(f"  {run} (μ {e['mean_loops']:g}, {e['points']} points): {params}; {_loo_text(e)}")
    for key, title in (("training", "training law"), ("unified", "unified law")):
        e = result["laws"][key]
        lines += ["", f"{title}: {e['formula']} ({e['points']} points)"]
        if e["status"] != "fitted":
            lines.append(f"  skipped: {e['reason']}")
            continue
        lines.append(f"  {'param':>6} {'value':>12}  95 % interval")
        lines += [f"  {k:>6} {v:>12.5g}  {_ci_text(e, k)}" for k, v in e["params"].items()]
        fit_err = e["fit_rel_error"]
        lines.append(
            f"  fit rel. error: mean {100 * fit_err['mean']:.2f} %, max {100 * fit_err['max']:.2f} %; {_loo_text(e)}"
        )
    lines += ["", "compute-optimal (unified law at T = μ, budget C = FLOPs per token(μ) · D)"]
    for name, e in result["compute_optimal"].items():
        if e.get("status") == "skipped":
            lines.append(f"  {name}: skipped, {e['reason']}")
            continue
        lines.append(f"  {name}:")
        lines.append(f"    {'FLOPs':>9} {'μ*':>4} {'tokens D*':>11} {'N(μ*)':>11} {'loss':>7}")
        for p in e["points"]:
            edge = "  (grid edge)" if p["at_grid_edge"] else ""
            lines.append(
                f"    {p['flops']:>9.3g} {p['mean_loops']:>4} {p['tokens']:>11.4g} {p['unrolled_params']:>11.4g} {p['loss']:>7.4f}{edge}"
            )
        if e["exponents"]:
            lines.append(
                f"    μ* ∝ C^{e['exponents']['mean_loops']:.3f}, D* ∝ C^{e['exponents']['tokens']:.3f}"
                f" (over the {e['exponent_budgets']} budgets with μ* inside the grid)"
            )
    if result.get("plots"):
        lines += ["", "plots: " + ", ".join(result["plots"])]
    return "\n".join(lines)
