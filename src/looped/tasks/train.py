"""Training and evaluating task models: `looped train --task`, `looped eval` on their checkpoints.

Algorithmic tasks (`looped.tasks.generators`) train a LoopedLM encoder; the vision tasks a LoopedViT
(`looped.tasks.vision`), and digit_names the two-stream model (`looped.tasks.multimodal`). One loop, `fit`,
trains all of them, with the LM trainer's optimizer step (`looped.train.step`) and training state
(`looped.train.state`): train.device and train.precision apply, a non-finite step is skipped and rolled back
as in `looped train`, and periodic checkpoints let a killed run resume (`looped train --task ... --resume`).

For the algorithmic tasks the model is the same LoopedLM as for text, made an encoder (model.causal = false; RoPE only, no absolute
positions, so it can run on longer inputs than it saw) with a class per position. The input is re-injected
every loop, as always. Each step draws a fresh batch of problems at the training size, and a loop count per
problem from the [loops] sampler. Gradients flow through the last k loops only, so the model cannot learn
to count loops: the loops before run without gradient from wherever the state is (Bansal et al.'s
"progressive loss" in spirit).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from looped.checkpoint import init_weights_from, read_run, save
from looped.config import Config, ConfigError, from_dict
from looped.distributed import Dist, train_device
from looped.model import accounting
from looped.model.lm import LoopedLM
from looped.tasks.generators import TASKS, check_size, exact_match, get_task, solved
from looped.train.optim import build_optimizers, lr_factor
from looped.train.sampler import LoopSampler, step_seed
from looped.train.state import (
    TrainingStopped,
    TrainState,
    load_training,
    resume_point,
    roll_back,
    save_training,
)
from looped.train.step import Stepper, StepResult, StopOnSignal, uses_bf16

CONTEXT = 8192  # RoPE table length for task models: test sizes far beyond the training size must fit
TEST_PROBLEMS = 256  # per size, in `looped eval` of an algorithmic task


def task_config(cfg: Config, task: str) -> Config:
    """`cfg` with its model made an encoder for `task`: the task's vocabulary, untied head, long context."""
    t = get_task(task)
    tree = cfg.to_dict()
    tree["model"].update(
        causal=False, vocab_size=t.vocab_size, tie_embeddings=False, max_seq_len=CONTEXT, value_embeds=False
    )
    return from_dict(tree)


def baseline_config(cfg: Config) -> Config:
    """The non-looped baseline of `cfg`: the same blocks run once each (prelude, core, coda in a row), so the
    same parameters less the injection and readout, and no recurrence to run longer at test time."""
    m = cfg.model
    tree = cfg.to_dict()
    tree["model"] = accounting.standard_config(m, m.prelude_layers + m.core_layers + m.coda_layers).to_dict()
    return from_dict(tree)


def parse_sizes(text: str) -> tuple[int, int]:
    """`--size` for training: "N" (every problem of size N) or "LO:HI" (a size drawn per step, both included)."""
    lo, sep, hi = text.partition(":")
    try:
        sizes = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"--size: expected N or LO:HI, got {text!r}") from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise ValueError(f"--size: need 1 ≤ LO ≤ HI, got {text!r}")
    return sizes


def parse_stages(text: str) -> list[tuple[int, int]]:
    """`--size` as a curriculum: stages separated by commas, each N or LO:HI ("16,32" or "2:8,2:20")."""
    return [parse_sizes(part) for part in text.split(",") if part.strip()] or [parse_sizes(text)]


def train_curriculum(
    cfg: Config,
    task: str,
    stages: list[tuple[int, int]],
    say: Callable[[str], None] = print,
    resume: bool = False,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train through `stages` of problem sizes, train.steps steps each, every stage starting from the one
    before. The mean loop count grows with the size: stage k samples μ·HIₖ / HI₀ loops, so that a model
    that needs about a loop per position keeps getting enough. Each stage is saved under
    train.out/stage-K-size-HI/final (a killed curriculum keeps its finished stages), the last also as
    train.out/final. With `resume`, each stage continues from its newest checkpoint: finished stages are
    restored as they ended, the interrupted one goes on, later ones start afresh."""
    import tempfile

    if len(stages) == 1:
        return train_task(cfg, task, stages[0], say, resume=resume)
    out = Path(cfg.train.out) if cfg.train.out else Path(tempfile.mkdtemp(prefix="looped-curriculum-"))
    tree, init, logs = cfg.to_dict(), cfg.train.init_from, []
    mu, first = cfg.loops.mean_loops, stages[0][1]
    for k, sizes in enumerate(stages):
        stage_dir = out / f"stage-{k}-size-{sizes[1]}"
        tree["loops"]["mean_loops"] = mu * sizes[1] / first
        tree["train"].update(out=str(stage_dir), init_from=init)
        say(f"stage {k + 1}/{len(stages)}: sizes {sizes[0]}..{sizes[1]}, μ = {mu * sizes[1] / first:g}")
        model, log = train_task(from_dict(tree), task, sizes, say, resume=resume)
        logs += [{**rec, "stage": k} for rec in log]
        init = str(stage_dir / "final")
    if cfg.train.out:
        shutil.copytree(init, out / "final", dirs_exist_ok=True)
    return model, logs


def step_size(task: str, sizes: tuple[int, int], seed: int, step: int) -> int:
    """The problem size of one training step: uniform over sizes[0]..sizes[1] (odd ones only for mazes)."""
    lo, hi = sizes
    if lo == hi:
        return lo
    rng = np.random.default_rng(step_seed(seed, step, stream=2))
    if task == "mazes":
        return int(rng.choice(np.arange(lo | 1, hi + 1, 2)))
    return int(rng.integers(lo, hi + 1))


def check_task(task: str) -> None:
    from looped.tasks import multimodal, vision

    known = [*TASKS, *vision.VISION_TASKS, *multimodal.MULTIMODAL_TASKS]
    if task not in known:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(known)}")


def train_task(
    cfg: Config,
    task: str,
    size: int | tuple[int, int] | None = None,
    say: Callable[[str], None] = print,
    resume: bool = False,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train a model for `task` for train.steps steps of train.global_batch examples; returns the model (on
    the CPU, in eval mode) and the logged records, and saves to train.out/final when train.out is set.

    Algorithmic tasks train at problem size `size` (or a size drawn per step from the range (lo, hi)); the
    vision and multimodal tasks (`looped.tasks.vision`, `looped.tasks.multimodal`) have no size. A
    non-looped model (core_layers = 0) trains too, as the baseline; its loop counts are ignored.

    Training checkpoints go to train.out/checkpoints every train.checkpoint_every steps (a temporary
    directory, removed at the end, when train.out is unset). With `resume`, training continues from the
    newest intact one, and gives what an uninterrupted run gives; without it, a train.out that holds
    checkpoints is refused.

    Raises:
        TrainingStopped: SIGINT or SIGTERM stopped the run after a checkpoint (resume continues it).
        TrainingError: the loss stayed non-finite after train.max_rollbacks roll-backs.
    """
    import tempfile

    model, cfg, draw, score, run = _task_model(cfg, task, size)
    scratch = not cfg.train.out
    run_dir = Path(tempfile.mkdtemp(prefix="looped-task-")) if scratch else Path(cfg.train.out)
    try:
        resume_from = resume_point(run_dir, resume, warn=say)
        was = read_run(resume_from).get("task") if resume_from is not None else task
        if was != task:
            raise ConfigError(f"{run_dir} holds a run of task {was}, not {task}; pick another train.out")
        if cfg.train.init_from and resume_from is None:  # a curriculum: a model trained at a smaller
            init_weights_from(model, cfg.train.init_from, grow_vocab=True)  # size, or on another task
            say(f"weights from {cfg.train.init_from}")
        log = train_steps(model, cfg, draw, score, say, run_dir=run_dir, resume_from=resume_from, run=run)
    finally:
        if scratch:
            shutil.rmtree(run_dir, ignore_errors=True)
    model.cpu()
    if cfg.train.out:
        save(model, run_dir / "final", cfg, **run)
        (run_dir / "task_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return model, log


def _task_model(
    cfg: Config, task: str, size: int | tuple[int, int] | None
) -> tuple[torch.nn.Module, Config, Callable[[int, int], tuple], Callable, dict]:
    """(model, config, draw(step, n), score(logits, targets), run.json fields) for `task`: a LoopedLM encoder
    for an algorithmic task (the config made an encoder by `task_config`), a LoopedViT or a TwoStreamModel."""
    from looped.tasks import multimodal, vision

    check_task(task)
    if task in vision.VISION_TASKS or task in multimodal.MULTIMODAL_TASKS:
        if size is not None:
            raise ConfigError(f"{task} has no problem size; drop --size")
        torch.manual_seed(cfg.train.seed)
        if task in vision.VISION_TASKS:
            vt = vision.VISION_TASKS[task]
            model: torch.nn.Module = vision.LoopedViT(cfg.model, vt)
            make, score = vt.batch, vision.accuracy
        else:
            model = multimodal.TwoStreamModel(cfg.model)
            make, score = multimodal.batch, exact_match

        def draw(step: int, n: int) -> tuple:
            return (*make("train", n, seed=step_seed(cfg.train.seed, step, stream=1)), "")

        return model, cfg, draw, score, {"task": task, "model_class": type(model).__name__}
    t = get_task(task)
    sizes = (32, 32) if size is None else (size, size) if isinstance(size, int) else tuple(size)
    for s_ in sizes:
        check_size(t, s_)
    cfg = task_config(cfg, task)
    torch.manual_seed(cfg.train.seed)

    def draw_problems(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        size = step_size(task, sizes, cfg.train.seed, step)
        x, y = t.batch(n, size, seed=step_seed(cfg.train.seed, step, stream=1))
        return x, y, f" at size {size}"

    run = {"task": task, "train_size": sizes[1], "train_sizes": list(sizes)}
    return LoopedLM(cfg.model), cfg, draw_problems, exact_match, run


def train_steps(
    model: torch.nn.Module,
    cfg: Config,
    draw: Callable[[int, int], tuple],
    score: Callable[[torch.Tensor, torch.Tensor], float],
    say: Callable[[str], None] = print,
    *,
    run_dir: Path,
    resume_from: Path | None = None,
    run: dict | None = None,
) -> list[dict]:
    """The task training loop: `draw(step, n)` gives (inputs, targets, a note for the log); a loop count per
    example from the [loops] sampler (for a looped model; one per stream for a model with `streams` = 2),
    gradients through the last k loops, the [optim] schedule, a record of loss and `score` twenty times a
    run. Each step is the LM trainer's (`looped.train.step.Stepper`): on train.device, in train.precision,
    a non-finite step skipped and, train.max_bad_steps in a row, rolled back to the last checkpoint with a
    lower rate. Checkpoints (with the log so far and `run` in run.json) go to run_dir/checkpoints at step
    0, every train.checkpoint_every steps, at the end and when SIGINT/SIGTERM asks to stop (which then
    raises TrainingStopped); `resume_from` continues from one. Leaves the model in eval mode."""
    tc = cfg.train
    d = Dist(device=train_device(tc))
    model.to(d.device).train()
    opts = build_optimizers(model, cfg.optim, backprop_loops=cfg.loops.resolved_backprop_loops)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    stepper = Stepper(model, model, opts, d, seed=tc.seed, clip=clip, bf16=uses_bf16(tc, d.device))
    samplers = [LoopSampler(cfg.loops, tc.seed + i, tc.steps) for i in range(getattr(model, "streams", 1))]
    k = samplers[0].backprop_loops
    log: list[dict] = []

    def checkpoint(state: TrainState) -> None:
        save_training(run_dir, state, model, opts, cfg, d, tc.keep_checkpoints, extra={"log": log}, run=run)

    def restore(path: Path) -> TrainState:
        state, record = load_training(path, model, opts)
        log[:] = record["log"]
        return state

    if resume_from is None:
        state = TrainState()
        checkpoint(state)  # a roll-back target before the first periodic checkpoint
    else:
        state = restore(resume_from)
        say(f"resumed from {resume_from} at step {state.step}")
    bad_in_row, every = 0, max(1, tc.steps // 20)
    with StopOnSignal() as stop:
        while state.step < tc.steps:
            t0 = time.perf_counter()
            opts.set_lr(lr_factor(cfg.optim, state.step, tc.steps) * state.lr_scale)
            x, y, note = draw(state.step, tc.global_batch)
            loops = _draw_loops(samplers, state.step, tc.global_batch) if model.cfg.looped else None
            out = stepper.step(state.step, [(x, y, loops)], k)
            state.seconds += time.perf_counter() - t0
            if out.finite:
                bad_in_row = 0
            else:
                state.skipped, bad_in_row = state.skipped + 1, bad_in_row + 1
                say(f"step {state.step}: non-finite loss; step skipped")
                if bad_in_row >= tc.max_bad_steps:
                    state, bad_in_row = roll_back(run_dir, state, tc, restore, say), 0
                    continue
            if state.step % every == 0 or state.step == tc.steps - 1:
                log.append(_task_record(state, out, score(out.output.logits.detach().float().cpu(), y), note))
                say(f"step {state.step}: loss {out.loss:.4f}, right {log[-1]['score']:.1%}{note}")
            state.step += 1
            state.tokens += tc.global_batch
            if state.step % tc.checkpoint_every == 0 or state.step == tc.steps or stop.requested:
                checkpoint(state)
            if stop.requested:  # without train.out, run_dir is scratch that train_task removes
                kept = (
                    f"the checkpoint in {run_dir} continues with --resume"
                    if tc.out
                    else "nothing was kept, as train.out is unset (set it to keep checkpoints --resume continues)"
                )
                raise TrainingStopped(f"stopped at step {state.step}; {kept}")
    model.eval()
    return log


def _draw_loops(samplers: list[LoopSampler], step: int, n: int) -> torch.Tensor | list[torch.Tensor]:
    """(n,) loop counts at `step`; a list of them, one per stream, for a two-stream model."""
    loops = [s.draw(step, n) for s in samplers]
    return loops[0] if len(loops) == 1 else loops


def _task_record(state: TrainState, out: StepResult, right: float, note: str) -> dict:
    return {
        "step": state.step,
        "loss": out.loss,
        "score": right,
        "note": note.strip(),
        "seconds": state.seconds,
    }


@torch.no_grad()
def evaluate_task(
    model: LoopedLM,
    task: str,
    sizes: list[int],
    loops: list[int],
    n: int = TEST_PROBLEMS,
    seed: int = 10_000,
    batch: int = 64,
    progress: bool = False,
) -> dict[int, dict[int, float]]:
    """Whole-problem exact match (every asked position right) at each size and loop count:
    {size: {loops: accuracy}}. Test problems come from another seed than training's. `progress` shows a
    bar on stderr, in units of loops × positions (the work grows with both). Runs where the model is."""
    from tqdm.auto import tqdm

    t = get_task(task)
    model.eval()
    device = next(model.parameters()).device
    problems = {size: t.batch(n, size, seed=seed) for size in sizes}
    for size, (x, _) in problems.items():
        if x.shape[1] > model.cfg.max_seq_len:
            raise ConfigError(
                f"size {size} makes {x.shape[1]} positions, over the model's {model.cfg.max_seq_len}"
            )
    work = sum(x.shape[1] * sum(loops) for x, _ in problems.values())
    table: dict[int, dict[int, float]] = {}
    with tqdm(
        total=work, desc=f"{task} exact match", disable=not progress, unit_scale=True, leave=False
    ) as bar:
        for size, (x, y) in problems.items():
            table[size] = {}
            for loops_t in loops:
                right = 0
                for i in range(0, n, batch):
                    logits = model(x[i : i + batch].to(device), loops=loops_t).logits.cpu()
                    right += int(solved(logits, y[i : i + batch]).sum())
                table[size][loops_t] = right / n
                bar.update(x.shape[1] * loops_t)
    return table


def format_task_table(
    table: dict[int, dict[int, float]], size_name: str, baseline: dict[int, float] | None = None
) -> str:
    """Exact match by size (rows) and loops (columns); with `baseline`, the non-looped model's column last."""
    loops = sorted({t for row in table.values() for t in row})
    head = f"{size_name:>14} " + " ".join(f"{f'T={t}':>7}" for t in loops)
    lines = [head + (f" {'baseline':>9}" if baseline is not None else "")]
    for size, row in table.items():
        line = f"{size:>14} " + " ".join(f"{row.get(t, math.nan):>7.1%}" for t in loops)
        if baseline is not None:
            line += f" {baseline.get(size, math.nan):>9.1%}"
        lines.append(line)
    return "\n".join(lines)


def load_task_model(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """A task checkpoint (`looped train --task`) and its run.json: a LoopedLM encoder, a LoopedViT or a
    TwoStreamModel, by the task it was trained on."""
    from looped.checkpoint import load, load_module, read_run
    from looped.tasks import multimodal, vision

    run = read_run(checkpoint)
    task = run.get("task")
    if task in vision.VISION_TASKS:
        return load_module(
            checkpoint, lambda cfg: vision.LoopedViT(cfg.model, vision.VISION_TASKS[task])
        ), run
    if task in multimodal.MULTIMODAL_TASKS:
        return load_module(checkpoint, lambda cfg: multimodal.TwoStreamModel(cfg.model)), run
    model = load(checkpoint)
    if model.cfg.causal:
        raise ConfigError(f"{checkpoint} is a language model, not a task model (train one with --task)")
    return model, run


def evaluate_task_checkpoint(
    checkpoint: str | Path,
    task: str | None,
    sizes: list[int] | None,
    loops: list[int],
    plot: str | None = None,
    baseline: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    problems: int | None = None,
) -> dict | None:
    """`looped eval` on a task checkpoint. None when neither `task` is given nor the checkpoint was trained on
    one. Algorithmic tasks: exact match at `sizes` × `loops` (sizes default: 1×, 2× and 4× the training
    size); vision: test accuracy at `loops`; digit_names: writing and reading accuracy on the grid `loops` ×
    `loops` (vision × text). With `baseline` (a non-looped checkpoint, `looped train --task … --baseline`),
    its accuracy at the same sizes. `problems`: test problems per size (algorithmic tasks; None: TEST_PROBLEMS). `device` and `dtype` ("auto"/"cpu"/"cuda", "float32"/"bfloat16"): where and
    in what precision the models run; None: the checkpoint's [infer] values."""
    from looped.checkpoint import load_config_dir, read_run
    from looped.infer.engine import resolve_device, resolve_dtype
    from looped.tasks import multimodal, vision

    run = read_run(checkpoint)
    task = task or run.get("task")
    if task is None:
        return None
    check_task(task)
    if run.get("task") not in (None, task):
        raise ConfigError(f"{checkpoint} was trained on {run['task']}, not {task}")
    sizeless = task in vision.VISION_TASKS or task in multimodal.MULTIMODAL_TASKS
    if sizeless and sizes is not None:
        raise ConfigError(f"{task} has no problem sizes; drop --sizes")
    if sizeless and problems is not None:
        raise ConfigError(f"{task} evaluates on its fixed test split; drop --problems")
    problems = TEST_PROBLEMS if problems is None else problems
    if problems < 1:
        raise ConfigError(f"--problems must be ≥ 1, got {problems}")
    if task in multimodal.MULTIMODAL_TASKS and baseline is not None:
        raise ConfigError(
            f"--baseline is not supported for {task}; evaluate the baseline checkpoint on its own"
        )
    infer = load_config_dir(checkpoint).infer
    where = resolve_device(device or infer.device)
    place = {"device": where, "dtype": resolve_dtype(dtype or infer.dtype, where)}
    model, run = load_task_model(checkpoint)
    model.to(**place)
    if task in multimodal.MULTIMODAL_TASKS:
        grid = multimodal.evaluate_multimodal(model, loops, loops)
        out: dict = {"task": task, "kind": "multimodal", "grid": grid}
        if plot:
            out["plot"] = str(plot_grid(grid, task, Path(plot)))
        return out

    def measure(m: torch.nn.Module, ts: list[int]) -> dict:
        if task in vision.VISION_TASKS:
            return vision.evaluate_vision(m, ts)
        return evaluate_task(m, task, sizes, ts, n=problems, progress=True)

    if task in vision.VISION_TASKS:
        size_name = "split"
    else:
        size_name = get_task(task).size_name
        if sizes is None:
            base = int(run.get("train_size", 8))
            sizes = [base, 2 * base, 4 * base] if task != "mazes" else [base, 2 * base + 1, 4 * base + 1]
    table = measure(model, loops)
    out = {"task": task, "kind": "table", "size_name": size_name, "train_size": run.get("train_size")}
    if task not in vision.VISION_TASKS:
        out["problems"] = problems
    out["table"] = table
    if baseline is not None:
        base_model, _ = load_task_model(baseline)
        base_model.to(**place)
        if base_model.cfg.looped:
            raise ConfigError(f"--baseline {baseline} is a looped model; train one with --baseline")
        out["baseline"] = {size: row[1] for size, row in measure(base_model, [1]).items()}
    if plot:
        out["plot"] = str(plot_task(table, size_name, task, Path(plot), out.get("baseline")))
    return out


def after_training(model: torch.nn.Module, task: str, size: int | None, mu: int) -> str:
    """The table `looped train --task` prints at the end: accuracy at 1, μ and 2μ loops (at the training
    size for an algorithmic task; on the test split otherwise)."""
    from looped.tasks import multimodal, vision

    loops = sorted({1, mu, 2 * mu}) if model.cfg.looped else [1]
    if task in multimodal.MULTIMODAL_TASKS:
        result = {"kind": "multimodal", "grid": multimodal.evaluate_multimodal(model, loops, loops)}
    elif task in vision.VISION_TASKS:
        result = {"kind": "table", "size_name": "split", "table": vision.evaluate_vision(model, loops)}
    else:
        table = evaluate_task(model, task, [size or 32], loops)
        result = {"kind": "table", "size_name": get_task(task).size_name, "table": table}
    return format_task_result(result)


def format_task_result(result: dict) -> str:
    """The text `looped eval` prints for a task checkpoint."""
    if result["kind"] == "multimodal":
        parts = []
        for kind, grid in result["grid"].items():
            texts = sorted({t for row in grid.values() for t in row})
            lines = [f"{kind}: exact match, rows vision loops, columns text loops"]
            lines.append(f"{'':>8} " + " ".join(f"{f'T={t}':>7}" for t in texts))
            for tv, row in grid.items():
                lines.append(f"{f'T={tv}':>8} " + " ".join(f"{row[t]:>7.1%}" for t in texts))
            parts.append("\n".join(lines))
        return "\n\n".join(parts)
    return format_task_table(result["table"], result["size_name"], result.get("baseline"))


def plot_grid(grid: dict[str, dict[int, dict[int, float]]], task: str, path: Path) -> Path:
    """One heat map per kind of answer: accuracy against vision loops (rows) and text loops (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid), figsize=(4.6 * len(grid), 4), dpi=120)
    for ax, (kind, rows) in zip(np.atleast_1d(axes), grid.items(), strict=True):
        tv = sorted(rows)
        tt = sorted({t for row in rows.values() for t in row})
        values = np.array([[100 * rows[a][b] for b in tt] for a in tv])
        im = ax.imshow(values, origin="lower", cmap="viridis", vmin=0, vmax=100)
        for i in range(len(tv)):
            for j in range(len(tt)):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(tt)), [str(t) for t in tt])
        ax.set_yticks(range(len(tv)), [str(t) for t in tv])
        ax.set_xlabel("text loops")
        ax.set_ylabel("vision loops")
        ax.set_title(f"{task}: {kind} (exact match %)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_task(
    table: dict[int, dict[int, float]],
    size_name: str,
    task: str,
    path: Path,
    baseline: dict[int, float] | None = None,
) -> Path:
    """Exact match against loops (log₂ axis), one line per problem size; the non-looped baseline at each size
    as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for size, row in table.items():
        xs = sorted(row)
        (line,) = ax.plot(xs, [100 * row[x] for x in xs], marker="o", label=f"{size} {size_name}")
        if baseline is not None and size in baseline:
            ax.axhline(100 * baseline[size], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T at test time")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(task + ("  (dashed: non-looped baseline)" if baseline else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
