"""Self-speculative decoding against plain decoding: batch 1, greedy, the per-loop KV cache.

A random model has no agreement between its loop counts, so the script uses a trained one: the checkpoint
given, or the demo preset trained here for --steps steps on the bundled Shakespeare (kept in
runs/bench-speculative, so a second run reuses it). For each loop count it decodes the same prompts plainly
with `looped.Engine` and with `looped.infer.speculative.generate_speculative` at several (draft loops,
lookahead) pairs, and reports tokens/s (median of --repeats), the speed-up, the drafts accepted, and
whether the tokens are identical.

    .venv/bin/python bench/infer_speculative.py [--checkpoint DIR] [--steps 150] [--tokens 64]
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

from looped.infer.engine import Engine
from looped.infer.speculative import generate_speculative

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["KING HENRY.", "ROMEO.", "First Citizen."]
PAIRS = [(1, 3), (1, 6), (2, 4), (2, 8)]


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
    subprocess.run(
        [
            sys.executable,
            "-m",
            "looped",
            "train",
            "--preset",
            "demo",
            "--set",
            f"train.steps={steps}",
            "--set",
            f"train.out={out}",
            "--set",
            f"data.path={data}",
        ],
        check=True,
    )
    return out / "final"


def timed(fn, repeats: int):
    results, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        results = fn()
        times.append(time.perf_counter() - t)
    return results, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loops", default="4,8,16")
    args = parser.parse_args()
    ckpt = Path(args.checkpoint) if args.checkpoint else trained_checkpoint(args.steps)
    engine = Engine.from_checkpoint(ckpt, kv_cache="per-loop", device="cpu", dtype="float32")
    model, tok = engine.model, engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    stop = set()  # a fixed number of tokens for every run: end-of-text does not stop either decoder
    print(
        f"# self-speculative decoding · {datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · {ckpt} · batch 1, greedy, {args.tokens} tokens, per-loop cache, "
        f"{len(prompts)} prompts, median of {args.repeats}"
    )
    print(
        f"{'loops':>5} {'draft':>5} {'ahead':>5} {'tokens/s':>9} {'speed-up':>8} {'accepted':>8} {'identical':>9}"
    )
    for loops in (int(t) for t in args.loops.split(",")):
        engine.stop_ids = set()

        def plain(loops=loops):
            return [
                engine.generate(p, loops=loops, max_new_tokens=args.tokens, temperature=0).token_ids
                for p in prompts
            ]

        log(f"loops {loops}: plain")
        reference, base = timed(plain, args.repeats)
        rate = len(prompts) * args.tokens / base
        print(f"{loops:>5} {'-':>5} {'-':>5} {rate:>9.1f} {1:>7.2f}× {'-':>8} {'-':>9}")
        for draft, ahead in PAIRS:
            if draft >= loops:
                continue
            log(f"loops {loops}: draft {draft}, lookahead {ahead}")

            def spec(loops=loops, draft=draft, ahead=ahead):
                return [
                    generate_speculative(
                        model,
                        p,
                        loops=loops,
                        draft_loops=draft,
                        lookahead=ahead,
                        max_new_tokens=args.tokens,
                        stop_ids=stop,
                    )
                    for p in prompts
                ]

            runs, seconds = timed(spec, args.repeats)
            same = [r.token_ids for r in runs] == reference
            accepted = sum(r.accepted for r in runs) / max(1, sum(r.drafted for r in runs))
            speed = len(prompts) * args.tokens / seconds
            print(
                f"{loops:>5} {draft:>5} {ahead:>5} {speed:>9.1f} {speed / rate:>7.2f}× {accepted:>8.0%} "
                f"{'yes' if same else 'NO':>9}"
            )


if __name__ == "__main__":
    main()
