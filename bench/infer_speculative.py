"""Self-speculative decoding against plain decoding and against a FLOP-matched Llama, greedy.

A random model has no agreement between its loop counts, so the script uses a trained one: the checkpoint
given, or the demo preset trained here for --steps steps on the bundled Shakespeare (kept in
runs/bench-speculative, so a second run reuses it). For each KV-cache mode, batch size (1: each prompt
alone, one after another; 8: eight prompts in one call) and loop count it decodes the same prompts with
`looped.Engine.generate`:
- plainly, and with `speculative="D:K"` for several (draft loops, lookahead) pairs and with "auto" (the pair
  a calibration made at the start predicts fastest);
- the reference: transformers' `LlamaForCausalLM` as wide as the model with prelude + loops·core + coda
  layers (FLOPs per token matched; random weights, `generate(..., do_sample=False)`), in the same dtype.
Reported: tokens/s (median of --repeats, whole generate calls), the speed-up over plain decoding, the share
of drafts kept, and whether the tokens equal plain decoding's (per-loop cache: they must; shared cache: the
verify pass computes something slightly different, so the share of equal tokens is shown).

    .venv/bin/python bench/infer_speculative.py [--checkpoint DIR] [--steps 150] [--tokens 64]
    .venv/bin/python bench/infer_speculative.py --quick      # 16 tokens, one repeat, loops 8: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import cpu_name, log  # bench/common.py: bench/ is on sys.path when a script runs
from infer_decode import llama

from looped.infer.budget import calibrate, calibrate_speculation
from looped.infer.engine import Engine
from looped.infer.speculative import choose

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "KING HENRY.",
    "ROMEO.",
    "First Citizen.",
    "HAMLET.",
    "JULIET.",
    "Enter MACBETH.",
    "LADY MACBETH.",
    "OTHELLO.",
]
PAIRS = [(1, 3), (1, 6), (2, 4)]


def trained_checkpoint(steps: int) -> Path:
    out = ROOT / "runs" / "bench-speculative"
    if (out / "final").is_dir():
        return out / "final"
    data = ROOT / "data" / "shakespeare"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "looped", "data", "prepare", "shakespeare", str(data)], check=True
        )
    log(f"training the demo preset for {steps} steps into {out} ...")
    cmd = [sys.executable, "-m", "looped", "train", "--preset", "demo"]
    for setting in (f"train.steps={steps}", f"train.out={out}", f"data.path={data}"):
        cmd += ["--set", setting]
    subprocess.run(cmd, check=True)
    return out / "final"


def timed(fn, repeats: int):
    results, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        results = fn()
        times.append(time.perf_counter() - t)
    return results, statistics.median(times)


def decode(engine: Engine, prompts: list[list[int]], batch: int, tokens: int, **kw) -> list:
    """Generations for every prompt: one call per prompt at batch 1, calls of `batch` prompts otherwise."""
    out = []
    for i in range(0, len(prompts), batch):
        got = engine.generate(prompts[i : i + batch], max_new_tokens=tokens, temperature=0, **kw)
        out += got
    return out


def llama_rate(engine: Engine, loops: int, prompts: list[list[int]], batch: int, tokens: int, repeats: int):
    cfg = engine.model.cfg
    hf = llama(cfg, cfg.prelude_layers + loops * cfg.core_layers + cfg.coda_layers).to(
        next(engine.model.parameters()).dtype
    )
    width = min(len(p) for p in prompts)  # equal lengths: no padding for the Llama
    ids = torch.tensor([p[:width] for p in prompts])

    def run():
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            hf.generate(
                part,
                attention_mask=torch.ones_like(part),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )

    run()
    _, seconds = timed(run, repeats)
    return len(prompts) * tokens / seconds


def rows_for(engine, loops, prompts, batch, args, auto):
    """(label, tokens/s, accepted, same) rows of one (mode, batch, loops) setting; the first is plain."""
    plain, base = timed(lambda: decode(engine, prompts, batch, args.tokens, loops=loops), args.repeats)
    reference = [g.token_ids for g in plain]
    rows = [("plain", len(prompts) * args.tokens / base, None, None)]
    specs = [(f"{d}:{k}", (d, k)) for d, k in PAIRS if d < loops]
    specs += [(f"auto {auto[0]}:{auto[1]}", auto)] if auto else [("auto: none", None)]
    for label, spec in specs:
        if spec is None:  # the calibration predicts no gain: auto decodes plainly
            rows.append((label, rows[0][1], None, None))
            continue
        runs, seconds = timed(
            lambda spec=spec: decode(engine, prompts, batch, args.tokens, loops=loops, speculative=spec),
            args.repeats,
        )
        same = sum(
            sum(a == b for a, b in zip(r.token_ids, ref, strict=False))
            for r, ref in zip(runs, reference, strict=True)
        ) / sum(len(ref) for ref in reference)
        accepted = sum(r.accepted for r in runs) / max(1, sum(r.drafted for r in runs))
        rows.append((label, len(prompts) * args.tokens / seconds, accepted, same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loops", default="4,8,16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--modes", default="per-loop,shared")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.loops, args.batches = 16, 1, "8", "1,8"
    ckpt = Path(args.checkpoint) if args.checkpoint else trained_checkpoint(args.steps)
    loop_list = [int(t) for t in args.loops.split(",")]
    print(
        f"# self-speculative decoding · {datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · {args.dtype} · {ckpt} · greedy, {args.tokens} tokens per prompt, "
        f"{len(PROMPTS)} prompts, median of {args.repeats}"
    )
    print(
        f"{'cache':>8} {'batch':>5} {'loops':>5} {'draft:ahead':>11} {'tokens/s':>9} {'speed-up':>8} "
        f"{'vs Llama':>8} {'accepted':>8} {'same tokens':>11}"
    )
    for mode in args.modes.split(","):
        engine = Engine.from_checkpoint(ckpt, kv_cache=mode, device="cpu", dtype=args.dtype)
        engine.stop_ids = set()  # a fixed number of tokens for every run
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        log(f"{mode}: calibrating for speculative='auto'")
        grid = sorted({1, 2, 4, *loop_list})
        engine.profile = calibrate(engine.model, loops=grid, tokens=8, repeats=3, kv_cache=mode)
        engine.profile.speculative = calibrate_speculation(engine.model, grid, kv_cache=mode)
        for batch in (int(b) for b in args.batches.split(",")):
            for loops in loop_list:
                log(f"{mode}, batch {batch}, loops {loops}")
                profile = engine.profile
                auto = choose(profile.speculative, lambda t, b=batch, p=profile: p.predict(b, t), loops)
                rows = rows_for(engine, loops, prompts, batch, args, auto)
                hf = llama_rate(engine, loops, prompts, batch, args.tokens, args.repeats)
                base = rows[0][1]
                for label, rate, accepted, same in rows:
                    acc = "-" if accepted is None else f"{accepted:.0%}"
                    eq = "-" if same is None else f"{same:.0%}"
                    print(
                        f"{mode:>8} {batch:>5} {loops:>5} {label:>11} {rate:>9.1f} {rate / base:>7.2f}× "
                        f"{rate / hf:>7.2f}× {acc:>8} {eq:>11}",
                        flush=True,
                    )
                print(f"{mode:>8} {batch:>5} {loops:>5} {'HF Llama':>11} {hf:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
