"""`looped fit`: read a sweep's results.jsonl, check it, fit the laws of `looped.science.laws` to it (test-time
per run, training and unified across runs), predict compute-optimal μ and tokens, and format the result.
Plotting the result is the caller's step (`looped.science.plots.plot_fits`); this module draws nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from looped.errors import FitError
from looped.science.laws import (
    HUBER_DELTA,
    Law,
    TestTimeLaw,
    TrainingLaw,
    UnifiedLaw,
    bootstrap,
    compute_optimal_scaling,
    group_indices,
    leave_one_out,
)

if TYPE_CHECKING:
    from looped.config import ModelConfig


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


def columns(recs: list[dict], standard_as_one: bool = False) -> dict[str, np.ndarray]:
    """The laws' columns (loops, mean_loops, unrolled_params, tokens, loss) of `recs` as float arrays; with
    `standard_as_one`, a standard model's loops and mean_loops read 1 (see below)."""

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
    law: type[Law],
    recs: list[dict],
    groups: list[str] | None,
    samples: int,
    seed: int,
    skip: str | None = None,
) -> tuple[dict, Law | None]:
    """One law's JSON entry (parameters, CIs, LOO error) and the fitted law; skipped with a reason."""
    cols = columns(recs, standard_as_one=True)
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
    n_groups = len(group_indices(len(y), groups))
    if samples <= 0:
        entry["bootstrap"] = {"skipped": "bootstrap_samples is 0"}
    elif n_groups < 2 or len(y) <= n_params:
        entry["bootstrap"] = {
            "skipped": f"needs more points than parameters ({len(y)} for {n_params}) and two groups"
        }
    else:
        entry["bootstrap"] = bootstrap(law, cols, y, groups, samples=samples, seed=seed, init=fitted)
    largest = max(len(p) for p in group_indices(len(y), groups))
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


@dataclass
class FitResult:
    """What `fit_results` found: the JSON summary (`to_json`, what `looped fit --json` prints) and, for
    plotting (`looped.science.plots.plot_fits`), the fitted laws with the points each was fitted to."""

    file: str
    records: list[dict]
    runs: dict[str, list[dict]]
    """Each run's records, sorted by loops."""
    laws: dict[str, dict]
    """JSON entries "test_time" (per run), "training" and "unified": parameters, intervals, errors or why skipped."""
    compute_optimal: dict[str, dict]
    """JSON entries per architecture (or "given"): compute-optimal μ and tokens per FLOP budget, or why skipped."""
    test_time_fits: dict[str, TestTimeLaw]
    """The test-time law of every looped run it could be fitted to."""
    training_points: list[dict]
    """One record per run: the loss at T = round(μ), or at the nearest T evaluated."""
    training_fit: TrainingLaw | None
    unified_points: list[dict]
    """Every record of a looped run and one per standard run."""
    unified_fit: UnifiedLaw | None
    plots: list[str] = field(default_factory=list)
    """Files the caller drew from this result, listed by `to_json` and `format_fit`."""

    def unified_columns(self) -> dict[str, np.ndarray]:
        """The columns the unified law was fitted to (a standard model at T = μ = 1)."""
        return columns(self.unified_points, standard_as_one=True)

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON: file, counts, the fit's settings, laws, compute-optimal and plots."""
        out: dict[str, Any] = {
            "file": self.file,
            "records": len(self.records),
            "runs": len(self.runs),
            "huber_delta": HUBER_DELTA,
            "residuals": "log loss",
            "laws": self.laws,
            "compute_optimal": self.compute_optimal,
        }
        if self.plots:
            out["plots"] = list(self.plots)
        return out


def save_fit(fit: FitResult, out: str | Path) -> Path:
    """Write `fit.to_json()` (the plots drawn so far listed in it) to out/fit.json; returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(fit.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def fit_results(
    path: str | Path,
    bootstrap_samples: int = 200,
    seed: int = 0,
    flops_per_token_fn: Callable[[int], float] | None = None,
    unrolled_params_fn: Callable[[int], float] | None = None,
) -> FitResult:
    """Fit the test-time (per looped run), training and unified laws to a results.jsonl.

    Args:
        path: the sweep's results.jsonl (see load_results for the keys).
        bootstrap_samples: resamples (of runs; of points for the per-run test-time law) for 95 % intervals.
        seed: the bootstrap's seed.
        flops_per_token_fn, unrolled_params_fn: μ → training FLOPs per token and μ → N(μ) of the model to
            plan compute-optimal runs for (see accounting_fns); when absent, each looped architecture
            (grouped by params) gets them from its records (see data_accounting).

    Returns:
        The fits; `to_json()` is the JSON summary, `looped.science.plots.plot_fits` draws them.

    A law without enough data is "skipped" with a reason; a malformed or empty file raises FitError.
    """
    if (flops_per_token_fn is None) != (unrolled_params_fn is None):
        raise ValueError("pass flops_per_token_fn and unrolled_params_fn together")
    records = load_results(path)
    runs = _by_run(records)
    test_time, fitted_tt = {}, {}
    for run, recs in runs.items():
        skip = None if recs[0]["looped"] else "standard model: its loss does not depend on loops"
        entry, law = _fit_law(TestTimeLaw, recs, None, bootstrap_samples, seed, skip)
        test_time[run] = {"mean_loops": recs[0]["mean_loops"], **entry}
        if law is not None:
            fitted_tt[run] = law

    chosen, loops_used = training_points(records)
    skip = _run_level_gap(chosen)
    training, fitted_b = _fit_law(
        TrainingLaw, chosen, [r["run"] for r in chosen], bootstrap_samples, seed, skip
    )
    training["loops_used"] = loops_used

    points = unified_points(records)
    skip = _run_level_gap(points)
    if skip is None and len({r["loops"] / r["mean_loops"] for r in points if r["looped"]}) < 2:
        skip = "no looped run evaluated at two values of T/μ, so Z and z cannot be fitted"
    unified, fitted_c = _fit_law(
        UnifiedLaw, points, [r["run"] for r in points], bootstrap_samples, seed, skip
    )

    if fitted_c is None:
        optimal = {"all": {"status": "skipped", "reason": "the unified law was not fitted"}}
    else:
        fns = None if flops_per_token_fn is None else (flops_per_token_fn, unrolled_params_fn)
        optimal = _compute_optimal_entries(fitted_c, records, _budgets(records), fns)
    return FitResult(
        file=str(path),
        records=records,
        runs=runs,
        laws={
            "test_time": {"formula": TestTimeLaw.formula, "runs": test_time},
            "training": training,
            "unified": unified,
        },
        compute_optimal=optimal,
        test_time_fits=fitted_tt,
        training_points=chosen,
        training_fit=fitted_b,
        unified_points=points,
        unified_fit=fitted_c,
    )


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


def format_fit(fit: FitResult) -> str:
    """The fits as readable tables: parameters with 95 % intervals, errors, compute-optimal predictions."""
    result = fit.to_json()
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
