"""What `looped generate`, `looped chat` and `looped calibrate` do with a checkpoint directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from looped.infer.budget import Profile, calibrate, calibrate_speculation
from looped.infer.engine import Engine, Generation
from looped.infer.speculative import choose


def generate_records(
    checkpoint: str | Path,
    prompt: str,
    loops: list[int | None],
    *,
    kv_cache: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    **kwargs,
) -> list[dict]:
    """Continue `prompt` once per entry of `loops` (None: the model's default or the budget's choice) with the
    checkpoint's tokenizer, on `device` in `dtype` (None: the checkpoint's [infer] values); `kwargs` go to
    `Engine.generate`. One JSON-ready record per run."""
    engine = _engine(checkpoint, kv_cache, device, dtype)
    records = []
    for t in loops:
        g = engine.generate(prompt, loops=t, **kwargs)
        records.append(record(g, t, engine, kwargs.get("exit")))
    return records


def _engine(checkpoint: str | Path, kv_cache: str | None, device: str | None, dtype: str | None) -> Engine:
    """The checkpoint's Engine, which must have a tokenizer to take text."""
    engine = Engine.from_checkpoint(checkpoint, kv_cache=kv_cache, device=device, dtype=dtype)
    if engine.tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer.json (checkpoints written by `looped train` carry one)")
    return engine


def record(g: Generation, loops: int | None, engine: Engine, exit: str | None) -> dict:
    d = g.to_dict()
    d["loops_per_token"] = d.pop("loops")
    return {
        "loops": loops if loops is not None else (max(g.loops) if g.loops else None),
        "exit": exit,
        "kv_cache": engine.kv_cache,
        "device": engine.device.type,
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "tokens": len(g.token_ids),
        **d,
    }


def calibrate_checkpoint(
    checkpoint: str | Path,
    loops: list[int],
    batch_sizes: list[int],
    tokens: int = 16,
    kv_cache: str | None = None,
    out: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Profile, Path]:
    """Measure decode ms per step against loops for the checkpoint on this machine (on `device` in `dtype`;
    None: the checkpoint's [infer] values); store the profile in the checkpoint directory (or `out`), where
    `Engine.from_checkpoint` finds it."""
    engine = Engine.from_checkpoint(checkpoint, kv_cache=kv_cache, device=device, dtype=dtype)
    cap = engine.infer.max_request_loops
    if max(loops) > cap:
        raise ValueError(f"loops must lie in [1, {cap}] (infer.max_request_loops), got {max(loops)}")
    profile = calibrate(
        engine.model, loops, batch_sizes, tokens=tokens, kv_cache=engine.kv_cache, progress=True
    )
    if engine.model.cfg.looped and max(loops) > 1:  # what speculative = "auto" picks its pair from
        profile.speculative = calibrate_speculation(engine.model, loops, kv_cache=engine.kv_cache)
    return profile, profile.save(out or checkpoint)


def format_profile(profile: Profile, path: Path) -> str:
    lines = [f"{'batch':>5} {'loops':>5} {'ms/step':>8} {'fit':>8}"]
    for b, measured in profile.measured.items():
        for t, ms in measured.items():
            lines.append(f"{b:>5} {t:>5} {ms:>8.2f} {profile.predict(b, t):>8.2f}")
    for b, (a, c) in profile.fit.items():
        lines.append(f"batch {b}: ms per step ≈ {a:.2f} + {c:.2f}·loops")
    if profile.speculative:
        for t, rates in profile.speculative["acceptance"].items():
            shares = ", ".join(f"{d} loops {a:.0%}" for d, a in rates.items())
            pair = choose(profile.speculative, lambda x: profile.predict(1, x), int(t))
            pick = f"draft at {pair[0]} loops, {pair[1]} ahead" if pair else "no speculation"
            lines.append(f"{t} loops: drafts kept at {shares} · speculative=auto: {pick}")
    lines.append(f"wrote {path}")
    return "\n".join(lines)


HELP = """commands: /loops N · /exit kl:1e-3 (or none) · /budget MS (or none) · /temperature X · /reset · /quit
Each line you type is appended to the conversation and the model continues it."""
HELP_TEMPLATED = HELP.replace(
    "Each line you type is appended to the conversation and the model continues it.",
    "Each line you type is a user message; the checkpoint's chat template formats the conversation.",
)


def chat(
    checkpoint: str | Path,
    *,
    kv_cache: str | None = None,
    loops: int | None = None,
    exit: str | None = None,
    max_ms_per_token: float | None = None,
    max_flops_per_token: float | None = None,
    min_loops: int | None = None,
    warm_start: bool | None = None,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    stop: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """An interactive session: each line is appended to the transcript and the model continues it, streaming;
    after each reply, the loops per token. The transcript is cut from the left to fit the context.
    `device` and `dtype` (None: the checkpoint's [infer] values) say where the model runs."""
    engine = _engine(checkpoint, kv_cache, device, dtype)
    context = engine.model.cfg.max_seq_len
    if context - max_new_tokens - 1 < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in a {context}-token context")
    settings = {
        "loops": loops,
        "exit": exit,
        "max_ms_per_token": max_ms_per_token,
        "temperature": temperature,
    }
    # With the checkpoint's chat template the model ends its turn with its own end-of-turn token; the plain
    # transcript has no such token, so a blank line ends a reply there.
    templated = engine.chat_format.template is not None
    fixed = {
        "max_flops_per_token": max_flops_per_token,
        "min_loops": min_loops,
        "warm_start": warm_start,
        "max_new_tokens": max_new_tokens,
        "stop": stop if stop is not None else ([] if templated else ["\n\n"]),
    }
    print(HELP if not templated else HELP_TEMPLATED, file=out)
    transcript = ""
    messages: list[dict[str, str]] = []
    turn = 0
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if line.startswith("/"):
            if _command(line, settings, out):
                return
            if line.strip() == "/reset":
                transcript, messages = "", []
            continue
        if templated:
            answer = _reply_templated(
                engine, [*messages, {"role": "user", "content": line}], settings, fixed, seed + turn, out
            )
            if answer is not None:
                messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
                turn += 1
            continue
        reply = _reply(engine, transcript + line + "\n", settings, fixed, seed + turn, out)
        if reply is not None:
            transcript = reply
            turn += 1


def _reply(
    engine: Engine, transcript: str, settings: dict, fixed: dict, seed: int, out: TextIO
) -> str | None:
    """Continue `transcript` (cut from the left to leave room for the reply), streaming to `out`; returns the
    transcript with the reply, or None after printing why a setting was refused."""
    room = engine.model.cfg.max_seq_len - fixed["max_new_tokens"] - 1
    ids = engine.tokenizer.encode(transcript)[-room:]
    text = _generate(engine, ids, settings, fixed, seed, out)
    return None if text is None else engine.tokenizer.decode(ids) + text + "\n"


def _reply_templated(
    engine: Engine, messages: list[dict[str, str]], settings: dict, fixed: dict, seed: int, out: TextIO
) -> str | None:
    """The assistant's answer to `messages` under the checkpoint's chat template (the oldest messages are
    dropped until the prompt leaves room for the reply); None after printing why it could not run."""
    room = engine.model.cfg.max_seq_len - fixed["max_new_tokens"] - 1
    while True:
        try:
            ids = engine.tokenizer.encode(engine.chat_format.render(messages))
        except ValueError as e:
            print(f"error: {e}", file=out)
            return None
        if len(ids) <= room or len(messages) == 1:
            break
        messages = messages[1:]
    return _generate(engine, ids[-room:], settings, fixed, seed, out)


def _generate(
    engine: Engine, ids: list[int], settings: dict, fixed: dict, seed: int, out: TextIO
) -> str | None:
    """Generate after `ids`, streaming to `out` and then the loops per token; the reply's text, or None after
    printing why a setting was refused."""

    def stream(req, delta):
        out.write(delta)
        out.flush()

    compute = dict(settings)
    if settings["loops"] is not None:
        compute["max_flops_per_token"] = None  # an explicit /loops replaces the FLOP budget
    try:
        g = engine.generate(ids, **{**fixed, **compute}, seed=seed, on_token=stream)
    except ValueError as e:
        print(f"error: {e}", file=out)
        return None
    text = engine.tokenizer.decode(g.token_ids) if g.text is None else g.text
    print(
        f"\n[{len(g.token_ids)} tokens · {g.tokens_per_s:.0f} tokens/s · mean loops {g.mean_loops:.2f} · "
        f"loops {' '.join(map(str, g.loops))}]",
        file=out,
    )
    return text


def _command(line: str, settings: dict, out: TextIO) -> bool:
    """Apply a /command; True means quit."""
    name, _, value = line.strip().partition(" ")
    value = value.strip()
    try:
        if name in ("/quit", "/exit-chat", "/q"):
            return True
        if name == "/loops":
            settings["loops"] = None if value in ("", "none") else int(value)
            settings["max_ms_per_token"] = None
        elif name == "/exit":
            settings["exit"] = None if value in ("", "none") else value
        elif name == "/budget":
            settings["max_ms_per_token"] = None if value in ("", "none") else float(value)
            settings["loops"] = None
        elif name == "/temperature":
            settings["temperature"] = float(value)
        elif name != "/reset":
            print(HELP, file=out)
            return False
    except ValueError:
        print(f"error: {line.strip()!r}: not a number", file=out)
        return False
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None) or "defaults"
    print(f"[{shown}]", file=out)
    return False
