"""`looped compare`: baselines matched within 2 %, budgets in tokens or FLOPs, a learning rate per model, seeds."""

from __future__ import annotations

import json

import pytest

from looped.checkpoint import load_config_dir
from looped.cli import main
from looped.config import ConfigError, load_config
from looped.model import accounting
from looped.science.compare import compare, format_compare, models, parse_budget, steps_for


@pytest.mark.parametrize("preset", ["debug", "demo", "parcae-140m"])
def test_baselines_match_params_and_flops_within_two_percent(preset):
    cfg = load_config([preset])
    built = models(cfg)
    mu = round(cfg.loops.mean_loops)
    looped_params = accounting.param_counts(cfg.model)["total"]
    params = accounting.param_counts(built["params-matched"].model)["total"]
    assert abs(params - looped_params) / looped_params < 0.02
    seq = cfg.model.max_seq_len
    target = accounting.flops_per_token(cfg.model, mu, seq)
    flops = accounting.flops_per_token(built["flops-matched"].model, 1, seq)
    assert abs(flops - target) / target < 0.02
    for role in ("params-matched", "flops-matched"):
        assert (
            not built[role].model.looped and built[role].optim == cfg.optim and built[role].data == cfg.data
        )


def test_budgets():
    cfg = load_config(["debug"], ["data.seq_len=64", "train.global_batch=8"])
    assert steps_for(cfg, *parse_budget("tokens=5120")) == 10
    built = models(cfg)
    flops = parse_budget("flops=1e12")
    # at equal FLOPs the FLOP-matched baseline gets about the looped model's tokens; the cheaper
    # parameter-matched one gets more
    assert steps_for(built["params-matched"], *flops) > steps_for(built["looped"], *flops)
    for bad in ("tokens", "steps=3", "tokens=-1", "flops=abc"):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad)


SETS = [
    "model.vocab_size=256",
    "model.width=32",
    "loops.mean_loops=2",
    "data.seq_len=32",
    "train.global_batch=4",
    "train.checkpoint_every=100",
    "eval.loops=[1]",
    "optim.warmup_steps=1",
    'optim.optimizer="muon"',
    "optim.lr=2e-3",
    "optim.muon_lr=0.02",
]


def test_compare_picks_a_rate_per_model_and_runs_the_seeds(data, tmp_path):
    summary = compare(
        ["debug"],
        [f"data.path={data}", *SETS],
        "tokens=768",
        seeds=2,
        lrs=[1e-3, 1e-2],
        eval_windows=4,
        out=tmp_path / "cmp",
        parallel=2,
        say=lambda m: None,
    )
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"looped", "params-matched", "flops-matched"}
    for r in rows.values():
        assert r["seeds"] == 2 and r["tokens"] == 768 and r["lr"] in (1e-3, 1e-2)
        assert set(r["lr_grid"]) == {1e-3, 1e-2} and r["lr"] == min(r["lr_grid"], key=r["lr_grid"].get)
        assert r["loss"] > 0 and r["loss_std"] >= 0
    assert list(rows["looped"]["loss_by_loops"]) == [1, 2, 4]
    lines = (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 * (2 + 1) * 3  # models × (grid + one more seed) × evaluated loop counts
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for r in rows.values():  # each grid rate scaled Muon's rate too: 1e-3 → 0.01, 1e-2 → 0.1
        saved = load_config_dir(tmp_path / "cmp" / f"{r['model']}_lr{r['lr']:g}_seed1" / "final").optim
        assert saved.lr == r["lr"] and saved.muon_lr == pytest.approx(10 * r["lr"])
    assert "params-matched" in format_compare(summary)
    # Resumed: nothing runs again.
    again = compare(
        ["debug"],
        [f"data.path={data}", *SETS],
        "tokens=768",
        seeds=2,
        lrs=[1e-3, 1e-2],
        eval_windows=4,
        out=tmp_path / "cmp",
        say=lambda m: None,
    )
    assert (tmp_path / "cmp" / "results.jsonl").read_text().splitlines() == lines
    assert (
        json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][0]["loss"]
        == again["rows"][0]["loss"]
    )


def test_compare_errors_are_one_line(capsys):
    assert main(["compare", "--preset", "debug", "--budget", "steps=3"]) == 2
    err = capsys.readouterr().err
    assert "tokens=N or flops=F" in err and err.count("\n") == 1
    assert (
        main(["compare", "--preset", "debug", "--budget", "tokens=100", "--set", "model.core_layers=0"]) == 2
    )
    assert "needs a looped model" in capsys.readouterr().err
