"""The training loop: build → maybe resume → per step: sample loops, forward/backward over micro-batches, check
finiteness, clip, step, schedule; evaluate and checkpoint when due; log. One code path for 1 process and torchrun."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looped import distributed
from looped.checkpoint import atomic_dir, init_weights_from, sha256, write_model_files
from looped.config import Config, ConfigError, from_dict, to_toml
from looped.data import DataError
from looped.data.loader import Loader, TokenData, val_windows
from looped.distributed import Dist
from looped.eval import default_eval_loops, loss_by_loops, perplexity
from looped.model.accounting import flops_per_token
from looped.model.lm import LoopedLM
from looped.train import state as ckpt
from looped.train.optim import Optimizers, build_optimizers, lr_factor, optimizer_summary
from looped.train.sampler import LoopSampler
from looped.train.state import TrainingError, TrainState
from looped.train.step import Stepper, StepResult, StopOnSignal, uses_bf16

__all__ = ["TrainResult", "TrainingError", "train"]


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    flops: float = 0.0  # training FLOPs (model.flops_per_token(training=True) at each sequence's drawn depth)
    eval: dict[int, float] = field(default_factory=dict)  # validation loss by loop count, at the end
    skipped: int = 0
    rollbacks: int = 0
    interrupted: bool = False
    final: Path | None = None
    rank: int = 0  # under torchrun only rank 0's result is reported

    def summary(self) -> str:
        """One line: steps, tokens, time, validation loss and perplexity at each evaluated loop count."""
        minutes, secs = divmod(int(self.seconds), 60)
        head = f"{'stopped' if self.interrupted else 'done'}: {self.steps} steps, {self.tokens:,} tokens in {minutes}m{secs:02d}s"
        if self.eval:
            best = min(self.eval, key=self.eval.get)
            head += (
                f"; val loss {self.eval[best]:.3f} (ppl {perplexity(self.eval[best]):.1f}) at {best} loops"
            )
        if self.skipped or self.rollbacks:
            head += f"; {self.skipped} steps skipped, {self.rollbacks} roll-backs"
        where = self.final or self.run_dir
        return f"{head} → {where}"


class _Log:
    """metrics.jsonl (rank 0), optional TensorBoard, and messages that do not break the progress bar."""

    def __init__(self, run_dir: Path, resume_step: int | None, d: Dist, tensorboard: bool) -> None:
        self.main = d.main
        self.bar = None
        self.file = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.main:
            return
        if resume_step is not None and self.file.exists():
            # Drop records a killed run wrote after its last checkpoint; the resumed run writes them again.
            keep = [
                r
                for r in self.file.read_text().splitlines()
                if r and json.loads(r).get("step", 0) <= resume_step
            ]
            self.file.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.tensorboard = true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, rec: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = rec["step"]
            for key, value in rec.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(key, value, step)
            for t, loss in rec.get("val_loss", {}).items():
                self.tb.add_scalar(f"val_loss/loops_{t}", loss, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _batch_layout(cfg: Config, d: Dist) -> tuple[int, int]:
    """(micro-batch, accumulation steps) with micro × accum × world = global batch."""
    g = cfg.train.global_batch
    micro = cfg.train.micro_batch or max(1, g // d.world)
    if g % (micro * d.world):
        raise ConfigError(
            f"train.global_batch = {g} must be a multiple of train.micro_batch ({micro}) × world size ({d.world})"
        )
    return micro, g // (micro * d.world)


def _check(cfg: Config, data: TokenData, d: Dist, log: _Log) -> Config:
    """Fit the model's vocabulary to the tokenizer and refuse combinations that cannot work."""
    vocab = data.tokenizer.vocab_size
    if cfg.model.vocab_size != vocab:
        log.say(
            f"model.vocab_size {cfg.model.vocab_size} → {vocab} to match the tokenizer in {cfg.data.path}"
        )
        tree = cfg.to_dict()
        tree["model"]["vocab_size"] = vocab
        cfg = from_dict(tree)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len = {cfg.data.seq_len} exceeds model.max_seq_len = {cfg.model.max_seq_len}"
        )
    if d.enabled and cfg.train.parallel == "fsdp" and cfg.model.spectral_norm:
        raise ConfigError("model.spectral_norm needs whole matrices; use train.parallel = 'ddp' with it")
    return cfg


def train(cfg: Config, resume: bool = False) -> TrainResult:
    """Train a looped LM as configured; with `resume`, continue from the run's newest intact checkpoint.

    Launched by torchrun, every rank runs this same function; rank 0 writes logs and checkpoints.
    """
    d = distributed.setup(cfg.train)
    try:
        return _train(cfg, d, resume)
    finally:
        distributed.teardown(d)


def _train(cfg: Config, d: Dist, resume: bool) -> TrainResult:
    run = _build(cfg, d, resume)
    state = _start(run)
    state, interrupted, last_eval = _loop(run, state)
    final = None if interrupted else _save_final(run, state)
    run.log.close()
    return TrainResult(
        run_dir=run.dir,
        steps=state.step,
        tokens=state.tokens,
        flops=state.flops,
        seconds=state.seconds,
        eval=last_eval,
        skipped=state.skipped,
        rollbacks=state.rollbacks,
        interrupted=interrupted,
        final=final,
        rank=d.rank,
    )


@dataclass
class _Run:
    """What `_build` makes once and the rest of a run reads."""

    cfg: Config  # resolved: the vocabulary fitted to the tokenizer
    d: Dist
    dir: Path
    resume_from: Path | None  # the checkpoint to resume from, if any
    model: LoopedLM
    net: nn.Module  # the model, or its DDP wrapper under torchrun
    opts: Optimizers
    stepper: Stepper
    loader: Loader
    val: torch.Tensor  # (N, seq_len + 1) validation windows
    sampler: LoopSampler
    micro: int  # sequences per forward pass
    accum: int  # micro-batches per rank per step
    log: _Log


def _build(cfg: Config, d: Dist, resume: bool) -> _Run:
    """Settle the config, then build in torchtitan's order: model (seeded init) → device → shard/wrap →
    optimizer; then the data loader, validation windows and loop sampler."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = Path(tc.out)
    resume_from = ckpt.resume_point(run_dir, resume, warn=print if d.main else lambda _: None)
    data = TokenData.open(cfg.data.path)
    log = _Log(run_dir, None, d, False)  # messages only, until the run directory is settled
    cfg = _check(cfg, data, d, log)
    micro, accum = _batch_layout(cfg, d)
    torch.manual_seed(tc.seed)
    model = LoopedLM(cfg.model)
    if tc.init_from and resume_from is None:
        init_weights_from(model, tc.init_from)
        log.say(f"weights from {tc.init_from}")
    model.activation_checkpointing = tc.activation_checkpointing
    model.to(d.device)
    net = distributed.wrap(model, tc, d)
    fsdp = d.enabled and tc.parallel == "fsdp"
    opts = build_optimizers(net, cfg.optim, sharded=fsdp, backprop_loops=cfg.loops.resolved_backprop_loops)
    stepper = Stepper(
        net,
        model,
        opts,
        d,
        seed=tc.seed,
        accum=accum,
        clip=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf,
        bf16=uses_bf16(tc, d.device),
        defer_sync=d.enabled and not fsdp,
    )
    return _Run(
        cfg=cfg,
        d=d,
        dir=run_dir,
        resume_from=resume_from,
        model=model,
        net=net,
        opts=opts,
        stepper=stepper,
        loader=Loader(data, cfg.data.seq_len, micro, accum, rank=d.rank, world_size=d.world, seed=tc.seed),
        val=val_windows(data, cfg.data.seq_len, cfg.eval.max_windows),
        sampler=LoopSampler(cfg.loops, tc.seed, tc.steps),
        micro=micro,
        accum=accum,
        log=log,
    )


def _start(run: _Run) -> TrainState:
    """Resume from the checkpoint, or start the run directory with a step-0 checkpoint (a roll-back target
    before the first periodic one); open the log and say what trains."""
    tc, d = run.cfg.train, run.d
    if run.resume_from is not None:
        state = _restore(run, run.resume_from)
        run.log = _Log(run.dir, state.step, d, tc.tensorboard)
        run.log.say(f"resumed from {run.resume_from} at step {state.step}")
    else:
        state = TrainState()
        run.dir.mkdir(parents=True, exist_ok=True)
        run.log = _Log(run.dir, None, d, tc.tensorboard)
        if d.main:
            (run.dir / "config.toml").write_text(to_toml(run.cfg))
        _checkpoint(run, state)
    run.log.say(
        f"training {run.model.num_params()['total']:,} parameters on {d.world} × {d.device.type} "
        f"({'bf16' if run.stepper.bf16 else 'fp32'}), {tc.global_batch} × {run.cfg.data.seq_len} tokens per "
        f"step (micro {run.micro} × accum {run.accum} × world {d.world}), loops {run.cfg.loops.sampler} "
        f"μ={run.cfg.loops.mean_loops:g} k={run.sampler.backprop_loops}, {optimizer_summary(run.opts)}"
    )
    from tqdm import tqdm

    run.log.bar = tqdm(
        total=tc.steps,
        initial=state.step,
        disable=not (d.main and tc.progress),
        unit="step",
        dynamic_ncols=True,
    )
    return state


def _loop(run: _Run, state: TrainState) -> tuple[TrainState, bool, dict[int, float]]:
    """Train until train.steps, or until a signal asks to stop; returns (the counters, stopped early, the
    last validation losses by loop count)."""
    cfg, tc = run.cfg, run.cfg.train
    meter = _Meter(cfg, run.sampler.backprop_loops)
    bad_in_row, last_eval = 0, {}
    with StopOnSignal() as stop:
        while state.step < tc.steps:
            t0 = time.perf_counter()
            run.opts.set_lr(lr_factor(cfg.optim, state.step, tc.steps) * state.lr_scale)
            depths = run.sampler.draw(state.step, tc.global_batch)  # (global batch,) loop counts
            out = run.stepper.step(state.step, _micro_batches(run, depths), run.sampler.backprop_loops)
            dt = time.perf_counter() - t0
            state.seconds += dt
            if out.finite:
                bad_in_row = 0
            else:
                state.skipped += 1
                bad_in_row += 1
                what = "loss" if not math.isfinite(out.loss) else "gradient"
                run.log.say(f"step {state.step}: non-finite {what}; step skipped")
                if bad_in_row >= tc.max_bad_steps:
                    state, bad_in_row = _roll_back(run, state), 0
                    continue
            state.step += 1
            state.tokens += tc.global_batch * cfg.data.seq_len
            state.flops += meter.add(depths, dt)
            _log_step(run, state, out, depths, meter)
            if _due(state.step, cfg.eval.every, tc.steps):
                last_eval = _evaluate(run, state.step)
            stop_now = distributed.all_max(int(stop.requested), run.d) > 0
            if _due(state.step, tc.checkpoint_every, tc.steps) or stop_now:
                _checkpoint(run, state)
            if stop_now:
                run.log.say(f"stopped at step {state.step} (checkpoint saved; continue with --resume)")
                return state, True, last_eval
    return state, False, last_eval


def _micro_batches(run: _Run, depths: torch.Tensor):
    """This rank's micro-batches of the step, each with its sequences' loop counts."""
    for i, (x, y) in enumerate(run.loader.next_step()):
        g = run.d.rank * run.accum + i  # global micro-batch index: fixes this micro's depths
        yield x, y, depths[g * run.micro : (g + 1) * run.micro]


def _due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due after `step` of `total`."""
    return step == total or (every > 0 and step % every == 0)


class _Meter:
    """Training FLOPs of each step (per token at each sequence's drawn depth, counted once per depth) and
    the throughput since the last metrics record."""

    def __init__(self, cfg: Config, backprop_loops: int) -> None:
        self.cfg, self.k = cfg, backprop_loops
        self.per_token: dict[int, float] = {}
        self.reset()

    def reset(self) -> None:
        self.tokens, self.flops, self.seconds = 0, 0.0, 0.0

    def add(self, depths: torch.Tensor, seconds: float) -> float:
        """Count one step of sequences at `depths`; returns its FLOPs."""
        seq = self.cfg.data.seq_len
        for t in depths.tolist():
            if t not in self.per_token:
                self.per_token[t] = flops_per_token(
                    self.cfg.model, t, seq, training=True, backprop_loops=self.k
                )
        flops = sum(self.per_token[t] for t in depths.tolist()) * seq
        self.tokens += len(depths) * seq
        self.flops += flops
        self.seconds += seconds
        return flops

    def rates(self) -> tuple[float, float]:
        """(tokens/s, GFLOP/s) since the last reset."""
        return self.tokens / self.seconds, self.flops / self.seconds / 1e9


def _log_step(run: _Run, state: TrainState, out: StepResult, depths: torch.Tensor, meter: _Meter) -> None:
    """The progress bar every step; a metrics.jsonl record every train.log_every steps and at the end."""
    tc = run.cfg.train
    tok_s, gflops = meter.rates()
    run.log.bar.set_postfix_str(
        f"loss {out.loss:.3f} · {tok_s:,.0f} tok/s · {gflops:.1f} GFLOP/s", refresh=False
    )
    run.log.bar.update(1)
    if not _due(state.step, tc.log_every, tc.steps):
        return
    norms = out.output.state_norms if out.output is not None else None
    run.log.record(
        {
            "step": state.step,
            "loss": out.loss,
            "lr": run.opts.lr,
            "tokens": state.tokens,
            "tokens_per_s": tok_s,
            "gflops": gflops,
            "grad_norm": out.grad_norm,
            "mean_loops": float(depths.float().mean()),
            "backprop_loops": run.sampler.backprop_loops,
            "skipped": state.skipped,
            "rho": _rho(run.model),
            "state_norms": [round(float(n), 4) for n in norms] if norms is not None else None,
        }
    )
    meter.reset()


def _evaluate(run: _Run, step: int) -> dict[int, float]:
    """Validation loss at each of eval.loops (default 1, 2, 4, μ, 2μ), said and recorded."""
    cfg = run.cfg
    loops = cfg.eval.loops or default_eval_loops(cfg.loops.mean_loops)
    losses = loss_by_loops(
        run.net, run.val, loops, cfg.eval.batch_size, run.d.device, run.d, run.stepper.autocast()
    )
    shown = "  ".join(f"T={t}: {v:.3f}" for t, v in losses.items())
    run.log.say(f"step {step}: val loss {shown}")
    run.log.record({"step": step, "val_loss": {str(t): v for t, v in losses.items()}})
    return losses


def _checkpoint(run: _Run, state: TrainState) -> None:
    ckpt.save_training(
        run.dir,
        state,
        run.net,
        run.opts,
        run.cfg,
        run.d,
        run.cfg.train.keep_checkpoints,
        tokenizer_file=_tokenizer_file(run.cfg),
        extra={"loader": run.loader.state_dict()},
    )


def _restore(run: _Run, path: Path) -> TrainState:
    """Weights, optimizer, RNG and loader position from the checkpoint at `path`; returns its counters."""
    state, record = ckpt.load_training(path, run.net, run.opts)
    try:
        run.loader.load_state_dict(record["loader"])
    except DataError as e:
        raise TrainingError(f"cannot resume from {path}: {e}") from None
    return state


def _roll_back(run: _Run, state: TrainState) -> TrainState:
    """Back to the newest intact checkpoint with a lower learning rate (or give up: TrainingError)."""
    restored = ckpt.roll_back(run.dir, state, run.cfg.train, lambda path: _restore(run, path), run.log.say)
    run.log.bar.n = restored.step
    run.log.bar.refresh()
    return restored


def _save_final(run: _Run, state: TrainState) -> Path | None:
    """run_dir/final: the weights, config, run.json and tokenizer, loadable by `looped.load` (rank 0 writes;
    every rank gathers the weights)."""
    weights = ckpt.full_model_state(run.net)
    final = None
    if run.d.main:
        final = run.dir / "final"
        tokenizer_file = _tokenizer_file(run.cfg)
        with atomic_dir(final) as tmp:
            tok = {"tokenizer_sha256": sha256(tokenizer_file)} if tokenizer_file.is_file() else {}
            cfg = run.cfg
            write_model_files(
                tmp, weights, cfg, cfg.model.tie_embeddings, world_size=run.d.world, step=state.step, **tok
            )
            if tokenizer_file.is_file():
                (tmp / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    distributed.barrier(run.d)
    return final


def _tokenizer_file(cfg: Config) -> Path:
    return Path(cfg.data.path) / "tokenizer.json"


def _rho(model: LoopedLM) -> float | None:
    """ρ(Ā) for the log; None for a standard model or when the injection's weights are FSDP shards."""
    if model.injection is None or any(hasattr(p, "full_tensor") for p in model.injection.parameters()):
        return None
    return model.injection.spectral_radius()
