"""`looped sweep GRID.toml`: a grid of training runs (mean loops, tokens, width, any config key), resumable,
several at once on one machine or written out as torchrun / scheduler commands, every result in one
results.jsonl — one record per run and evaluated loop count, the input of `looped fit`.

    [sweep]
    base = ["debug"]                          # presets or config files, in order
    set = ["data.path=data/tiny", "train.progress=false"]   # overrides for every run
    out = "runs/sweep"                        # runs in out/<name>/, results in out/results.jsonl
    seeds = [0]                               # train.seed of each repeat
    eval_loops = [1, 2, 4, 8]                 # loop counts every run is evaluated at
    eval_windows = 32                         # validation windows per evaluation
    parallel = 1                              # runs at once; each gets cores / parallel threads

    [grid]                                    # every combination is one run (times each seed)
    "loops.mean_loops" = [2, 4]
    "model.width" = [64, 128]
    "train.steps" = [100, 200]

    [variants]                                # optional: named bundles of overrides, each times the grid
    parcae = []
    additive = ["model.injection=\"additive\"", "model.readout=false", "model.prelude_norm=false"]
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looped.config import Config, ConfigError, load_config, to_toml
from looped.science.workers import WorkerExit, run_jobs

RESULTS = "results.jsonl"
SWEEP_KEYS = {"base", "set", "out", "seeds", "eval_loops", "eval_windows", "parallel"}


def set_lr(tree: dict[str, dict[str, Any]], lr: float) -> None:
    """Set a config tree's learning rate to `lr` for a learning-rate grid. optim.lr is AdamW's rate; with
    optim.optimizer = "muon", Muon's rate on the hidden matrices moves by the same factor, so that a grid
    point scales the whole optimizer (the tree's own ratio muon_lr / lr is kept)."""
    optim = tree["optim"]
    if optim.get("optimizer") == "muon":
        optim["muon_lr"] = optim["muon_lr"] * lr / optim["lr"]
    optim["lr"] = lr


@dataclass
class Grid:
    """A parsed GRID.toml."""

    path: Path
    base: list[str]
    overrides: list[str]
    out: Path
    axes: dict[str, list[Any]]
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: dict[str, list[str]] = field(default_factory=dict)  # name → overrides; {} is one plain variant
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_windows: int = 32
    parallel: int = 1

    def runs(self) -> list[tuple[str, list[str]]]:
        """(name, overrides) of every run: each variant times the grid's product times the seeds, in a fixed
        order; a variant's overrides come before the grid's."""
        keys = list(self.axes)
        out = []
        for variant, bundle in self.variants.items() or [(None, [])]:
            for values in itertools.product(*(self.axes[k] for k in keys)):
                for seed in self.seeds:
                    sets = [f"{k}={_toml(v)}" for k, v in zip(keys, values, strict=True)]
                    parts = [f"{k.split('.')[-1]}{_slug(v)}" for k, v in zip(keys, values, strict=True)]
                    head = [_slug(variant)] if variant is not None else []
                    name = "_".join([*head, *parts, f"seed{seed}"])
                    out.append((name, [*bundle, *sets, f"train.seed={seed}"]))
        return out

    def variant_of(self, name: str) -> str | None:
        """The variant a run name belongs to (None without variants)."""
        matches = [v for v in self.variants if name.startswith(_slug(v) + "_")]
        return max(matches, key=lambda v: len(_slug(v)), default=None)

    def config(self, name: str, sets: list[str]) -> Config:
        """The resolved config of one run, its output inside the sweep directory."""
        return load_config(self.base, [*self.overrides, *sets, f"train.out={self.out / name}"])


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def load_grid(path: str | Path) -> Grid:
    """Parse and check a GRID.toml: every run's config must resolve, so mistakes show before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such grid file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"sweep", "grid", "variants"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table [{sorted(unknown)[0]}]; a grid has [sweep], [grid] and optionally [variants]"
        )
    sweep, axes, variants = data.get("sweep", {}), data.get("grid", {}), data.get("variants", {})
    for name, bundle in variants.items():
        if not isinstance(bundle, list) or not all(isinstance(s, str) and "=" in s for s in bundle):
            raise ConfigError(f"{path}: variants.{name} must be a list of 'section.key=value' strings")
    if len({_slug(v) for v in variants}) < len(variants):
        raise ConfigError(f"{path}: two variants have the same name once made a folder name")
    bad = set(sweep) - SWEEP_KEYS
    if bad:
        raise ConfigError(
            f"{path}: unknown key sweep.{sorted(bad)[0]}; known: {', '.join(sorted(SWEEP_KEYS))}"
        )
    if not axes and not variants:
        raise ConfigError(
            f"{path}: [grid] is empty; give at least one 'section.key' = [values] or [variants]"
        )
    for key, values in axes.items():
        if "." not in key:
            raise ConfigError(f'{path}: grid key {key!r} must be section.key, e.g. "loops.mean_loops"')
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values")
    base = sweep.get("base", [])
    overrides = sweep.get("set", [])
    if isinstance(base, str):
        base = [base]
    if not isinstance(overrides, list) or not all(isinstance(s, str) for s in overrides):
        raise ConfigError(f"{path}: sweep.set must be a list of 'section.key=value' strings")
    out = Path(sweep["out"]) if "out" in sweep else path.with_suffix("")  # relative to the working directory
    grid = Grid(
        path=path,
        base=list(base),
        overrides=list(overrides),
        out=out,
        axes=axes,
        seeds=list(sweep.get("seeds", [0])),
        eval_loops=list(sweep.get("eval_loops", [1, 2, 4, 8])),
        eval_windows=int(sweep.get("eval_windows", 32)),
        parallel=int(sweep.get("parallel", 1)),
        variants=variants,
    )
    if grid.parallel < 1 or grid.eval_windows < 1 or not grid.eval_loops or min(grid.eval_loops) < 1:
        raise ConfigError(f"{path}: sweep.parallel and sweep.eval_windows must be ≥ 1, eval_loops ≥ 1")
    for name, sets in grid.runs():
        try:
            grid.config(name, sets)
        except ConfigError as e:
            raise ConfigError(f"{path}: run {name}: {e}") from None
    return grid


def read_results(results: Path) -> list[dict]:
    """Every record of a results.jsonl (none if it does not exist yet)."""
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def format_table(records: list[dict], order: list[str] | None = None) -> str:
    """Validation loss against evaluated loops, one row per run with its seeds averaged (mean ± standard
    deviation where there are several), each row's best loss in brackets; rows in the order of the run
    names in `order` (a grid's), else as they finished."""
    import statistics

    def unseeded(name: str) -> str:
        return re.sub(r"_?seed\d+$", "", name) or "run"

    by_run: dict[str, dict[int, dict[int, float]]] = {}  # name without seed → loops → seed → loss
    for r in records:
        by_run.setdefault(unseeded(r["run"]), {}).setdefault(r["loops"], {})[r["seed"]] = r["loss"]
    if order is not None:
        rank = {name: i for i, name in reversed(list(enumerate(unseeded(n) for n in order)))}
        by_run = dict(sorted(by_run.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    if not by_run:
        return "no finished runs yet"
    loops = sorted({t for runs in by_run.values() for t in runs})
    width = max(len(n) for n in by_run)
    lines = [f"{'run':<{width}} {'seeds':>5} " + " ".join(f"{f'T={t}':>13}" for t in loops)]
    for name, runs in by_run.items():
        means = {t: statistics.fmean(runs[t].values()) for t in runs}
        best = min(means, key=means.get)
        cells = []
        for t in loops:
            if t not in runs:
                cells.append(f"{'-':>13}")
                continue
            vals = list(runs[t].values())
            text = f"{means[t]:.3f}" + (f"±{statistics.stdev(vals):.3f}" if len(vals) > 1 else "")
            cells.append(f"{('[' + text + ']') if t == best else text:>13}")
        seeds = max(len(v) for v in runs.values())
        lines.append(f"{name:<{width}} {seeds:>5} " + " ".join(cells))
    return "\n".join(lines)


def finished_runs(results: Path) -> set[str]:
    """Names of runs that already have records (a resumed sweep skips them)."""
    if not results.is_file():
        return set()
    done = set()
    for i, line in enumerate(results.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["run"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{results}:{i}: not a results record; move the file away to start over"
            ) from None
    return done


def run_one(
    cfg_tree: dict, name: str, extra: dict, eval_loops: list[int], windows: int, threads: int
) -> list[dict]:
    """Train one run (resuming it if it was interrupted) and evaluate it; returns its results records.

    Runs in a worker process: threads are set here, before any work."""
    import torch

    torch.set_num_threads(threads)
    from looped.checkpoint import load
    from looped.config import from_dict
    from looped.data.loader import TokenData, val_windows
    from looped.eval import loss_by_loops
    from looped.model import accounting
    from looped.train.trainer import train

    cfg = from_dict(cfg_tree)
    cfg.train.progress = False
    result = train(cfg, resume=True)
    if result.interrupted or result.final is None:
        return []
    model = load(result.final)
    val = val_windows(TokenData.open(cfg.data.path), cfg.data.seq_len, windows)
    losses = loss_by_loops(model, val, eval_loops, cfg.eval.batch_size)
    m = model.cfg
    mu = cfg.loops.mean_loops if m.looped else 1.0
    params = accounting.param_counts(m)["total"]
    return [
        {
            "run": name,
            "seed": cfg.train.seed,
            "looped": m.looped,
            "mean_loops": mu,
            "loops": t,
            "loss": loss,
            "params": params,
            "unrolled_params": accounting.unrolled_params(m, max(1, round(mu))) if m.looped else params,
            "tokens": result.tokens,
            "flops": result.flops,
            "seconds": result.seconds,
            "width": m.width,
            **extra,
        }
        for t, loss in losses.items()
    ]


def run_sweep(grid_path: str | Path, commands: str | None = None, say: Callable[[str], None] = print) -> Path:
    """Run every grid point not yet in results.jsonl (or, with `commands` = "torchrun" or "slurm", write the
    commands that would, and return their file). Returns the results file."""
    grid = load_grid(grid_path)
    grid.out.mkdir(parents=True, exist_ok=True)
    results = grid.out / RESULTS
    done = finished_runs(results)
    todo = [(n, s) for n, s in grid.runs() if n not in done]
    for name, sets in grid.runs():  # every run's resolved config, for the record and for commands
        d = grid.out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(to_toml(grid.config(name, sets)))
    if commands is not None:
        return _write_commands(grid, todo, commands)
    say(
        f"sweep {grid.path}: {len(grid.runs())} runs, {len(done)} done, {len(todo)} to run, {grid.parallel} at once"
    )
    axes = list(grid.axes)
    jobs = [
        (
            name,
            grid.config(name, sets),
            {"grid": dict(zip(axes, _values(sets, axes), strict=True)), "variant": grid.variant_of(name)},
        )
        for name, sets in todo
    ]
    execute(jobs, results, grid.parallel, grid.eval_loops, grid.eval_windows, say)
    return results


def execute(
    jobs: list[tuple[str, Config, dict]],
    results: Path,
    parallel: int,
    eval_loops: list[int],
    eval_windows: int,
    say: Callable[[str], None] = print,
    worker: Callable[..., list[dict]] | None = None,
) -> list[dict]:
    """Train and evaluate (name, config, extra record fields) jobs, `parallel` at once in worker processes;
    append each finished run's records to `results` as it finishes and return them all. A failed or
    interrupted run is reported and left out, to be resumed by the next call. `worker` (a module-level
    function with run_one's arguments) replaces run_one.

    SIGINT or SIGTERM stops the workers with this process: each run in progress saves a checkpoint, and
    `looped.science.workers.Stopped` is raised once they have all exited (see that module)."""
    if not jobs:
        return []
    threads = max(1, (os.cpu_count() or 1) // parallel)
    calls = [(cfg.to_dict(), name, extra, eval_loops, eval_windows, threads) for name, cfg, extra in jobs]
    out: list[dict] = []
    for n, (i, records) in enumerate(run_jobs(worker or run_one, calls, min(parallel, len(jobs))), 1):
        where = f"[{n}/{len(jobs)}] {jobs[i][0]}"
        if records == [] or (isinstance(records, WorkerExit) and records.interrupted):
            say(f"{where}: interrupted; run again to resume it")
            continue
        if isinstance(
            records, BaseException
        ):  # one failed run does not stop the others; it is rerun next time
            say(f"{where}: failed: {type(records).__name__}: {records}")
            continue
        with results.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        out += records
        best = min(records, key=lambda r: r["loss"])
        at = f" at {best['loops']} loops" if "loops" in best else ""
        say(f"{where}: loss {best['loss']:.4f}{at}")
    return out


def _values(sets: list[str], axes: list[str]) -> list[Any]:
    out = []
    for key in axes:
        text = [s for s in sets if s.startswith(key + "=")][-1]  # the grid's, after a variant's
        out.append(tomllib.loads(f"v = {text.split('=', 1)[1]}")["v"])
    return out


def _write_commands(grid: Grid, todo: list[tuple[str, list[str]]], kind: str) -> Path:
    """A shell script (torchrun) or a Slurm array job that trains every remaining run, then collects."""
    me = f"{shlex.quote(sys.executable)} -m looped"
    train = [
        f"torchrun --nproc_per_node=${{NPROC:-1}} -m looped train --config {shlex.quote(str(grid.out / n / 'config.toml'))} --resume"
        for n, _ in todo
    ]
    collect = f"{me} sweep {shlex.quote(str(grid.path))}  # evaluates finished runs into {RESULTS}"
    if kind == "torchrun":
        path = grid.out / "commands.sh"
        path.write_text("#!/usr/bin/env bash\nset -e\n" + "\n".join(train) + "\n" + collect + "\n")
    elif kind == "slurm":
        path = grid.out / "sweep.sbatch"
        cases = "\n".join(f"  {i}) {cmd} ;;" for i, cmd in enumerate(train))
        path.write_text(
            "#!/usr/bin/env bash\n"
            f"#SBATCH --array=0-{max(0, len(train) - 1)}\n#SBATCH --job-name=looped-sweep\n"
            f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}\nesac\n'
            f"# when the array has finished: {collect}\n"
        )
    else:
        raise ValueError(f"--commands must be torchrun or slurm, got {kind!r}")
    path.chmod(0o755)
    return path
