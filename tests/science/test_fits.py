"""Scaling-law fits against known parameters: synthetic points from a chosen law, brute-force compute-optimal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from looped.science.fits import (
    FitError,
    accounting_fns,
    data_accounting,
    fit_results,
    format_fit,
    load_results,
)
from looped.science.laws import (
    TestTimeLaw,
    TrainingLaw,
    UnifiedLaw,
    bootstrap,
    compute_optimal,
    compute_optimal_scaling,
    leave_one_out,
)
from looped.science.plots import plot_fits

# Parcae-like values (arXiv 2604.12946 reports a ≈ 0.77, b ≈ 0.5): every term matters on the grids below.
TRUE = {
    TestTimeLaw: TestTimeLaw(L_inf=2.5, Z=1.2, z=0.35),
    TrainingLaw: TrainingLaw(E=2.0, A=4e4, a=0.7, B=5000.0, b=0.5),
    UnifiedLaw: UnifiedLaw(E=2.0, X=4e4, x=0.7, Y=5000.0, y=0.5, Z=0.8, z=1.5),
}
AMPLITUDES = {"Z", "A", "B", "X", "Y"}


def grid(law: type, n: int = 6) -> dict[str, np.ndarray]:
    """Inputs on the ranges of a small sweep: N 1e6..1e8, D 1e7..1e9, T 1..32, μ in {2, 4, 8}."""
    if law is TestTimeLaw:
        return {"loops": np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32], dtype=float)}
    n_ = np.geomspace(1e6, 1e8, n)
    d_ = np.geomspace(1e7, 1e9, n)
    if law is TrainingLaw:
        N, D = np.meshgrid(n_, d_, indexing="ij")
        return {"unrolled_params": N.ravel(), "tokens": D.ravel()}
    N, D, mu, T = np.meshgrid(n_, d_, [2.0, 4.0, 8.0], [1.0, 2, 4, 8, 16, 32], indexing="ij")
    return {"unrolled_params": N.ravel(), "tokens": D.ravel(), "mean_loops": mu.ravel(), "loops": T.ravel()}


def noisy(law, cols: dict, noise: float, seed: int = 0) -> np.ndarray:
    clean = law.predict(**cols)
    return clean * (1 + noise * np.random.default_rng(seed).standard_normal(clean.shape))


@pytest.mark.parametrize("law", [TestTimeLaw, TrainingLaw, UnifiedLaw], ids=lambda c: c.__name__)
def test_fit_recovers_known_parameters(law):
    true = TRUE[law]
    cols = grid(law, n=10 if law is TrainingLaw else 4)
    exact = law.fit(cols, noisy(true, cols, 0.0))
    for name, value in true.params.items():
        assert exact.params[name] == pytest.approx(value, rel=5e-3), name
    # With 0.3 % noise the offset and exponents come back within 5 %. An amplitude is log C = c + e·log N̄
    # with log N̄ ≈ 17, so a 0.3 % error in its exponent moves it by ~5 %: its Cramér-Rao spread on these
    # grids is 3-6 %, so it is checked at 15 % (about three standard deviations).
    fitted = law.fit(cols, noisy(true, cols, 0.003, seed=1))
    for name, value in true.params.items():
        assert fitted.params[name] == pytest.approx(value, rel=0.15 if name in AMPLITUDES else 0.05), name


def test_fit_ignores_an_outlier():
    """Huber residuals: one run logged at twice its loss barely moves the test-time fit."""
    true, cols = TRUE[TestTimeLaw], grid(TestTimeLaw)
    y = noisy(true, cols, 0.001)
    y[5] *= 2
    fitted = TestTimeLaw.fit(cols, y)
    for name, value in true.params.items():
        assert fitted.params[name] == pytest.approx(value, rel=0.05), name


def test_bootstrap_intervals_contain_truth():
    true, cols = TRUE[TrainingLaw], grid(TrainingLaw, n=6)
    y = noisy(true, cols, 0.003, seed=2)
    out = bootstrap(TrainingLaw, cols, y, samples=60, seed=0)
    fitted = TrainingLaw.fit(cols, y)
    assert out["samples"] + out["failed"] == 60 and out["samples"] >= 55
    for name, value in true.params.items():
        lo, hi = out["ci"][name]
        assert lo < hi and lo <= value <= hi, (name, lo, value, hi)
        assert lo <= fitted.params[name] <= hi
    # The same resamples of clean data collapse onto the truth: intervals measure the noise.
    clean = bootstrap(TrainingLaw, cols, noisy(true, cols, 0.0), samples=20, seed=0)
    for name in true.params:
        lo, hi = clean["ci"][name]
        assert hi - lo < 0.2 * (out["ci"][name][1] - out["ci"][name][0]), name


def test_leave_one_out_error_follows_the_noise():
    true, cols = TRUE[TestTimeLaw], grid(TestTimeLaw)
    clean = leave_one_out(TestTimeLaw, cols, noisy(true, cols, 0.0))
    rough = leave_one_out(TestTimeLaw, cols, noisy(true, cols, 0.01, seed=3))
    assert clean["folds"] == 10 and clean["max_rel_error"] < 1e-3
    assert rough["mean_rel_error"] > 0.004 and rough["mean_rel_error"] > 10 * clean["mean_rel_error"]
    # Held-out points are predicted worse than the fit matches the points it saw.
    y = noisy(true, cols, 0.01, seed=3)
    in_sample = np.mean(np.abs(TestTimeLaw.fit(cols, y).predict(**cols) - y) / y)
    assert rough["mean_rel_error"] > 1.2 * in_sample


def linear_fns(params: float = 2e6, core: float = 4e6, overhead: float = 1.2):
    """N(μ) = params + (μ − 1)·core; training FLOPs per token by the 6N rule with ⌈μ/2⌉ gradient loops."""

    def n_fn(mu):
        return params + (mu - 1) * core

    return (lambda mu: overhead * (2 * n_fn(mu) + 4 * n_fn(math.ceil(mu / 2)))), n_fn


def test_compute_optimal_minimises_the_law_under_the_budget():
    law = TRUE[UnifiedLaw]
    fpt, n_fn = linear_fns()
    for budget in (1e15, 1e17, 1e19):
        best = compute_optimal(law, budget, fpt, n_fn)
        assert fpt(best["mean_loops"]) * best["tokens"] == pytest.approx(budget)
        # Brute force: every integer μ and a fine grid of token counts the budget allows.
        brute = min(
            law.predict(
                unrolled_params=n_fn(mu),
                tokens=np.geomspace(1e3, budget / fpt(mu), 400),
                loops=mu,
                mean_loops=mu,
            ).min()
            for mu in range(1, 65)
        )
        assert best["loss"] <= brute + 1e-12
        assert best["loss"] == pytest.approx(
            law.predict(
                unrolled_params=n_fn(best["mean_loops"]),
                tokens=best["tokens"],
                loops=best["mean_loops"],
                mean_loops=best["mean_loops"],
            )
        )


def test_compute_optimal_grows_with_the_budget():
    """With N(μ) ∝ μ and FLOPs = 6·N·D the unified law at T = μ splits a budget as Chinchilla's law does:
    N* ∝ C^(y/(x+y)) and D* ∝ C^(x/(x+y)), so μ* and D* grow as power laws of the budget."""
    law = TRUE[UnifiedLaw]

    def n_fn(mu):
        return 4e6 * mu

    out = compute_optimal_scaling(law, [10 ** (k / 4) for k in range(60, 77)], lambda mu: 6 * n_fn(mu), n_fn)
    mus = [p["mean_loops"] for p in out["points"]]
    tokens = [p["tokens"] for p in out["points"]]
    assert mus == sorted(mus) and mus[0] <= 3 and mus[-1] == 64 and out["points"][-1]["at_grid_edge"]
    assert all(b > a for a, b in zip(tokens, tokens[1:], strict=False))
    assert out["exponent_budgets"] == len(mus) - 1  # the budget whose μ* is pinned at 64 is left out
    assert out["exponents"]["mean_loops"] == pytest.approx(law.y / (law.x + law.y), abs=0.02)
    assert out["exponents"]["tokens"] == pytest.approx(law.x / (law.x + law.y), abs=0.02)


def test_accounting_fns_and_data_accounting_agree():
    from helpers import tiny

    cfg = tiny()
    fpt, n_fn = accounting_fns(cfg, seq_len=32)
    recs = [
        {
            "params": n_fn(1),
            "unrolled_params": n_fn(mu),
            "mean_loops": mu,
            "tokens": 1e6,
            "flops": fpt(mu) * 1e6,
        }
        for mu in (2, 4, 8)
    ]
    fpt_d, n_d, _ = data_accounting(recs)
    for mu in (1, 3, 16, 64):
        assert n_d(mu) == pytest.approx(n_fn(mu))
        assert fpt_d(mu) == pytest.approx(fpt(mu), rel=0.15)


# ---------------------------------------------------------------------------------------------- files


def write_results(path, runs: list[tuple[float, float, float]], noise: float = 0.002, seed: int = 0):
    """A results.jsonl from the unified law: runs given as (params, tokens, μ); core = 0.4·params."""
    law, rng, lines = TRUE[UnifiedLaw], np.random.default_rng(seed), []
    for params, tokens, mu in runs:
        looped = mu > 1
        n = params * (1 + 0.4 * (mu - 1))
        fpt = 6 * n
        for t in sorted({1, 2, 4, int(mu), 2 * int(mu), 4 * int(mu)}) if looped else [1, 2]:
            loss = law.predict(unrolled_params=n, tokens=tokens, loops=t if looped else 1, mean_loops=mu)
            rec = {
                "run": f"p{params:.0e}-d{tokens:.0e}-mu{mu:g}",
                "looped": looped,
                "mean_loops": mu,
                "loops": t,
                "params": params,
                "unrolled_params": n,
                "tokens": tokens,
                "flops": fpt * tokens,
                "loss": loss * (1 + noise * rng.standard_normal()),
                "seed": 0,
            }
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


SWEEP = [(p, d, mu) for p in (1e6, 4e6, 1.6e7) for d in (1e7, 1e8, 1e9) for mu in (1.0, 4.0)]


def test_fit_results_end_to_end(tmp_path):
    path = write_results(tmp_path / "results.jsonl", SWEEP)
    fit = fit_results(path, bootstrap_samples=20)
    fit.plots = [str(p) for p in plot_fits(fit, tmp_path / "plots")]
    result = fit.to_json()
    json.dumps(result, allow_nan=False)
    laws = result["laws"]
    assert result["runs"] == 18
    tt = laws["test_time"]["runs"]
    assert (
        tt["p1e+06-d1e+07-mu1"]["status"] == "skipped"
        and "standard model" in tt["p1e+06-d1e+07-mu1"]["reason"]
    )
    assert tt["p1e+06-d1e+07-mu4"]["status"] == "fitted"
    # The training law at T = μ is the unified law with its loop term folded into E.
    true = TRUE[UnifiedLaw]
    assert laws["training"]["status"] == "fitted" and laws["training"]["loops_used"]["p1e+06-d1e+07-mu4"] == 4
    assert laws["training"]["params"]["E"] == pytest.approx(true.E + true.Z * math.exp(-true.z), rel=0.05)
    assert laws["training"]["params"]["b"] == pytest.approx(true.y, rel=0.1)
    uni = laws["unified"]
    assert uni["status"] == "fitted" and uni["loo"]["folds"] == 18 and uni["loo"]["mean_rel_error"] < 0.02
    for name in ("E", "x", "y", "z"):
        lo, hi = uni["bootstrap"]["ci"][name]
        assert lo <= true.params[name] <= hi, name
    opt = result["compute_optimal"]
    assert set(opt) == {"params=1e+06", "params=4e+06", "params=1.6e+07"}
    assert all(e["status"] == "fitted" and len(e["points"]) >= 3 for e in opt.values())
    text = format_fit(fit)
    assert "unified law" in text and "μ* ∝ C^" in text and "standard model" in text
    assert "plots: " + ", ".join(fit.plots) in text
    for name in ("fit_test_time.png", "fit_training.png", "fit_unified.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len(result["plots"]) == 3


def test_too_few_runs_skip_laws_with_a_reason(tmp_path):
    path = write_results(tmp_path / "one.jsonl", [(1e6, 1e8, 4.0)])
    fit = fit_results(path, bootstrap_samples=10)
    written = plot_fits(fit, tmp_path / "plots")
    result = fit.to_json()
    assert result["laws"]["test_time"]["runs"]["p1e+06-d1e+08-mu4"]["status"] == "fitted"
    assert result["laws"]["training"] == {**result["laws"]["training"], "status": "skipped"}
    for law in ("training", "unified"):
        assert (
            "needs at least 5 runs with distinct (unrolled_params, tokens), has 1"
            in result["laws"][law]["reason"]
        )
    assert result["compute_optimal"]["all"]["status"] == "skipped"
    assert "skipped" in format_fit(fit)
    assert [p.name for p in written] == ["fit_test_time.png"]  # only the law that was fitted is drawn
    # Five runs that all share one token count cannot separate B·D^−b from E.
    same_d = write_results(tmp_path / "same.jsonl", [(p, 1e8, 4.0) for p in (1e6, 2e6, 4e6, 8e6, 1.6e7)])
    assert "same tokens" in fit_results(same_d, bootstrap_samples=0).laws["training"]["reason"]


GOOD = {"run": "a", "looped": True, "mean_loops": 4, "loops": 2, "params": 1e6, "unrolled_params": 2e6,
        "tokens": 1e8, "flops": 1e15, "loss": 3.1}  # fmt: skip


@pytest.mark.parametrize(
    "lines, line, message",
    [
        ([], None, "no records"),
        ([json.dumps(GOOD), "{not json"], 2, "not JSON"),
        ([json.dumps({k: v for k, v in GOOD.items() if k != "tokens"})], 1, "missing key 'tokens'"),
        ([json.dumps({**GOOD, "loops": "2"})], 1, "'loops' must be a number"),
        ([json.dumps({**GOOD, "loops": 2.5})], 1, "must be an integer"),
        ([json.dumps({**GOOD, "looped": 1})], 1, "'looped' must be true or false"),
        (["", json.dumps({**GOOD, "loss": float("nan")})], 2, "not finite"),
        ([json.dumps({**GOOD, "loss": -1})], 1, "'loss' must be > 0"),
        ([json.dumps(GOOD), json.dumps([1, 2])], 2, "expected a JSON object"),
        ([json.dumps(GOOD), json.dumps({**GOOD, "loops": 4, "tokens": 2e8})], 2, "line 1"),
        ([json.dumps(GOOD), json.dumps(GOOD)], 2, "again"),
    ],
)
def test_malformed_results_raise_fit_error_with_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines))
    where = f"{path}:{line}" if line else str(path)
    with pytest.raises(FitError, match=message) as info:
        load_results(path)
    assert str(info.value).startswith(where + ":")
    with pytest.raises(FitError):
        fit_results(path)


def test_load_results_normalises_types(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({**GOOD, "loops": 2.0, "width": 64}) + "\n\n")
    (rec,) = load_results(path)
    assert rec["loops"] == 2 and isinstance(rec["loops"], int)


def test_cli_fit_out_writes_fit_json_and_plots(tmp_path, capsys):
    """`looped fit --out OUT` writes what its help says: OUT/fit.json (what --json prints) and the plots."""
    from looped.cli import main

    path = write_results(tmp_path / "results.jsonl", SWEEP)
    out = tmp_path / "fit"
    assert main(["fit", str(path), "--bootstrap", "5", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "fit.json").read_text())
    assert saved == printed and saved["runs"] == 18 and saved["laws"]["unified"]["status"] == "fitted"
    assert sorted(saved["plots"]) == sorted(
        str(out / n) for n in ("fit_test_time.png", "fit_training.png", "fit_unified.png")
    )
    assert main(["fit", str(path), "--bootstrap", "5", "--out", str(out)]) == 0
    assert f"wrote {out / 'fit.json'}" in capsys.readouterr().out
