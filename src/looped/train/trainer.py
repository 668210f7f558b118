"""The training loop: build → maybe resume → per step: sample loops, forward/backward over micro-batches, check
finiteness, clip, step, schedule; evaluate and checkpoint when due; log. One code path for 1 process and torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looped.checkpoint import atomic_dir, init_weights_from, write_model_files
from looped.config import Config, ConfigError, from_dict, to_toml
from looped.data import DataError
from looped.data.loader import Loader, TokenData, val_windows
from looped.model.accounting import flops_per_token
from looped.model.lm import LoopedLM
from looped.eval import default_eval_loops, loss_by_loops, perplexity
from looped.train import state as ckpt
from looped import distributed
from looped.distributed import Dist
from looped.train.optim import build_optimizers, describe, lr_factor
from looped.train.sampler import LoopSampler, step_seed


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. it kept diverging after every roll-back); the message says why."""


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


def _forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loops: torch.Tensor, k: int):
    """One micro-batch forward; a module-level function so tests can inject faults."""
    return model(x, labels=y, loops=loops, backprop_loops=k)


class _Stop:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = Path(tc.out)
    found = ckpt.checkpoints(run_dir)
    if found and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or pick another train.out"
        )
    data = TokenData.open(cfg.data.path)
    resume_from = ckpt.latest_valid(run_dir, warn=print if d.main else lambda _: None) if resume else None
    if resume and found and resume_from is None:
        raise TrainingError(f"{run_dir}: no intact checkpoint to resume from")
    log = _Log(run_dir, None, d, False)  # messages only, until the run directory is settled
    cfg = _check(cfg, data, d, log)
    micro, accum = _batch_layout(cfg, d)
    seq = cfg.data.seq_len
    fsdp = d.enabled and tc.parallel == "fsdp"

    # Build: model (seeded init) → device → shard/wrap → optimizer, torchtitan's order.
    torch.manual_seed(tc.seed)
    model = LoopedLM(cfg.model)
    if tc.init_from and resume_from is None:
        init_weights_from(model, tc.init_from)
        log.say(f"weights from {tc.init_from}")
    model.activation_checkpointing = tc.activation_checkpointing
    model.to(d.device)
    net = distributed.wrap(model, tc, d)
    opts = build_optimizers(net, cfg.optim, sharded=fsdp)
    loader = Loader(data, seq, micro, accum, rank=d.rank, world_size=d.world, seed=tc.seed)
    val = val_windows(data, seq, cfg.eval.max_windows)
    sampler = LoopSampler(cfg.loops, tc.seed, tc.steps)
    eval_loops = cfg.eval.loops or default_eval_loops(cfg.loops.mean_loops)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and d.device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    tokenizer_file = Path(cfg.data.path) / "tokenizer.json"

    state = {
        "step": 0,
        "tokens": 0,
        "flops": 0.0,
        "lr_scale": 1.0,
        "rollbacks": 0,
        "skipped": 0,
        "seconds": 0.0,
    }
    if resume_from is not None:
        state.update(_restore(resume_from, net, opts, loader, cfg))
        log = _Log(run_dir, state["step"], d, tc.tensorboard)
        log.say(f"resumed from {resume_from} at step {state['step']}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = _Log(run_dir, None, d, tc.tensorboard)
        if d.main:
            (run_dir / "config.toml").write_text(to_toml(cfg))
        # A step-0 checkpoint gives a roll-back target before the first periodic one.
        ckpt.save_training(
            run_dir, 0, net, opts, cfg, tokenizer_file, _record(state, loader), d, tc.keep_checkpoints
        )

    unit = model.num_params()["total"]
    log.say(
        f"training {unit:,} parameters on {d.world} × {d.device.type} ({'bf16' if bf16 else 'fp32'}), "
        f"{tc.global_batch} × {seq} tokens per step (micro {micro} × accum {accum} × world {d.world}), "
        f"loops {cfg.loops.sampler} μ={cfg.loops.mean_loops:g} k={sampler.backprop_loops}, {describe(opts)}"
    )
    from tqdm import tqdm

    log.bar = tqdm(
        total=tc.steps,
        initial=state["step"],
        disable=not (d.main and tc.progress),
        unit="step",
        dynamic_ncols=True,
    )
    params = [p for p in net.parameters() if p.requires_grad]
    bad_in_row = 0
    last_eval: dict[int, float] = {}
    window = {"tokens": 0, "flops": 0.0, "seconds": 0.0}
    fpt_cache: dict[int, float] = {}
    interrupted = False
    with _Stop() as stop:
        while state["step"] < tc.steps:
            step = state["step"]
            t0 = time.perf_counter()
            opts.set_lr(lr_factor(cfg.optim, step, tc.steps) * state["lr_scale"])
            depths = sampler.draw(step, tc.global_batch)  # (global batch,) loop counts
            k = sampler.backprop_loops
            loss_sum = torch.zeros((), device=d.device)
            norms = None
            for i, (x, y) in enumerate(loader.next_step()):
                g = d.rank * accum + i  # global micro-batch index: fixes this micro's depths and noise
                torch.manual_seed(step_seed(tc.seed, step, 1 + g))
                sync = contextlib.nullcontext()
                if d.enabled and not fsdp and i < accum - 1:
                    sync = net.no_sync()
                with sync:
                    with autocast():
                        out = _forward_loss(
                            net,
                            x.to(d.device),
                            y.to(d.device),
                            depths[g * micro : (g + 1) * micro].to(d.device),
                            k,
                        )
                    (out.loss / accum).backward()
                loss_sum += out.loss.detach() / accum
                norms = out.state_norms
            grad_norm = torch.nn.utils.clip_grad_norm_(params, _clip_value(cfg))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            loss = float(distributed.all_reduce_sum(loss_sum, d)) / d.world
            finite = math.isfinite(loss) and math.isfinite(float(grad_norm))
            if finite:
                opts.step()
                model.constrain_()
                bad_in_row = 0
            else:
                state["skipped"] += 1
                bad_in_row += 1
                log.say(
                    f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}; step skipped"
                )
            opts.zero_grad()
            dt = time.perf_counter() - t0
            state["seconds"] += dt
            if bad_in_row >= tc.max_bad_steps:
                state = _rollback(run_dir, net, opts, loader, cfg, state, log, d)
                bad_in_row = 0
                continue

            state["step"] = step + 1
            state["tokens"] += tc.global_batch * seq
            for t in depths.tolist():
                if t not in fpt_cache:
                    fpt_cache[t] = flops_per_token(cfg.model, t, seq, training=True, backprop_loops=k)
            step_flops = sum(fpt_cache[t] for t in depths.tolist()) * seq
            window["flops"] += step_flops
            state["flops"] += step_flops
            window["tokens"] += tc.global_batch * seq
            window["seconds"] += dt
            tok_s = window["tokens"] / window["seconds"]
            gflops = window["flops"] / window["seconds"] / 1e9
            log.bar.set_postfix_str(
                f"loss {loss:.3f} · {tok_s:,.0f} tok/s · {gflops:.1f} GFLOP/s", refresh=False
            )
            log.bar.update(1)
            done = state["step"]
            if done % tc.log_every == 0 or done == tc.steps:
                log.record(
                    {
                        "step": done,
                        "loss": loss,
                        "lr": opts.lr,
                        "tokens": state["tokens"],
                        "tokens_per_s": tok_s,
                        "gflops": gflops,
                        "grad_norm": float(grad_norm),
                        "mean_loops": float(depths.float().mean()),
                        "backprop_loops": k,
                        "skipped": state["skipped"],
                        "rho": _rho(model),
                        "state_norms": [round(float(n), 4) for n in norms] if norms is not None else None,
                    }
                )
                window = {"tokens": 0, "flops": 0.0, "seconds": 0.0}
            every = cfg.eval.every
            if done == tc.steps or (every and done % every == 0):
                last_eval = loss_by_loops(net, val, eval_loops, cfg.eval.batch_size, d.device, d, autocast())
                shown = "  ".join(f"T={t}: {v:.3f}" for t, v in last_eval.items())
                log.say(f"step {done}: val loss {shown}")
                log.record({"step": done, "val_loss": {str(t): v for t, v in last_eval.items()}})
            stop_now = distributed.all_max(int(stop.requested), d) > 0
            if done % tc.checkpoint_every == 0 or done == tc.steps or stop_now:
                ckpt.save_training(
                    run_dir,
                    done,
                    net,
                    opts,
                    cfg,
                    tokenizer_file,
                    _record(state, loader),
                    d,
                    tc.keep_checkpoints,
                )
            if stop_now:
                interrupted = True
                log.say(f"stopped at step {done} (checkpoint saved; continue with --resume)")
                break

    final = None
    if not interrupted:
        weights = ckpt.full_model_state(net)
        if d.main:
            final = run_dir / "final"
            with atomic_dir(final) as tmp:
                tok = {"tokenizer_sha256": ckpt.sha256(tokenizer_file)} if tokenizer_file.is_file() else {}
                write_model_files(
                    tmp, weights, cfg, cfg.model.tie_embeddings, world_size=d.world, step=state["step"], **tok
                )
                if tokenizer_file.is_file():
                    (tmp / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        distributed.barrier(d)
    log.close()
    result = TrainResult(
        run_dir=run_dir,
        steps=state["step"],
        tokens=state["tokens"],
        flops=state["flops"],
        seconds=state["seconds"],
        eval=last_eval,
        skipped=state["skipped"],
        rollbacks=state["rollbacks"],
        interrupted=interrupted,
        final=final,
        rank=d.rank,
    )
    return result


def _rho(model: LoopedLM) -> float | None:
    """ρ(Ā) for the log; None for a standard model or when the injection's weights are FSDP shards."""
    if model.injection is None or any(hasattr(p, "full_tensor") for p in model.injection.parameters()):
        return None
    return model.injection.spectral_radius()


def _clip_value(cfg: Config) -> float:
    return cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf


def _record(state: dict[str, Any], loader: Loader) -> dict[str, Any]:
    return {**state, "loader": loader.state_dict()}


def _restore(path: Path, net: nn.Module, opts, loader: Loader, cfg: Config) -> dict[str, Any]:
    saved = ckpt.load_training(path, net, opts, cfg.model.tie_embeddings)
    try:
        loader.load_state_dict(saved["loader"])
    except DataError as e:
        raise TrainingError(f"cannot resume from {path}: {e}") from None
    restored = {key: saved[key] for key in ("step", "tokens", "lr_scale", "rollbacks", "skipped", "seconds")}
    restored["flops"] = saved.get("flops", 0.0)  # checkpoints before FLOP totals were kept: counted from here
    return restored


def _rollback(run_dir, net, opts, loader, cfg: Config, state, log: _Log, d: Dist) -> dict[str, Any]:
    """Return to the newest intact checkpoint with the learning rate scaled down, or give up."""
    tc = cfg.train
    rollbacks = state["rollbacks"] + 1
    if rollbacks > tc.max_rollbacks:
        raise TrainingError(
            f"{tc.max_bad_steps} non-finite steps in a row after {tc.max_rollbacks} roll-backs; the run diverges "
            f"(try a lower optim.lr, loops.backprop_loops or model.spectral_norm)"
        )
    path = ckpt.latest_valid(run_dir, warn=log.say)
    if path is None:
        raise TrainingError(f"{run_dir}: diverged and there is no intact checkpoint to roll back to")
    restored = _restore(path, net, opts, loader, cfg)
    restored["lr_scale"] = state["lr_scale"] * tc.rollback_lr_scale
    restored["rollbacks"] = rollbacks
    restored["skipped"] = state["skipped"]
    log.say(
        f"step {state['step']}: {tc.max_bad_steps} non-finite steps in a row; rolled back to step "
        f"{restored['step']} with the learning rate × {restored['lr_scale']:g} (roll-back {rollbacks}/{tc.max_rollbacks})"
    )
    log.bar.n = restored["step"]
    log.bar.refresh()
    return restored
