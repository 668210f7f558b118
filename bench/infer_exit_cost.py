"""What each adaptive-exit criterion costs per loop, and what it saves: batch 1, greedy, per-loop KV cache.

Two measurements per criterion on a trained model (the checkpoint given, or the one
bench/infer_speculative.py trains):
- overhead: decode time per token at a fixed 8 loops with a threshold no token reaches (every loop runs),
  against no criterion: the price of checking after each loop (`kl`, `entropy` and `argmax` run the coda
  and the head after every loop; `state` compares two vectors);
- at the criterion's default threshold: mean loops, tokens/s and the share of tokens equal to fixed 8
  loops (teacher-free: each run decodes its own continuation, compared position by position).

    .venv/bin/python bench/infer_exit_cost.py [--checkpoint DIR] [--tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name, log  # bench/common.py: bench/ is on sys.path when a script runs
from infer_speculative import PROMPTS, trained_checkpoint

from looped.infer.engine import Engine
from looped.infer.exit import DEFAULT_THRESHOLD

LOOPS = 8
# Thresholds no token reaches: every loop runs, so only the checking costs.
NEVER = {"kl": "kl:1e-30", "entropy": "entropy:1e-30", "state": "state:1e-30", "argmax": "argmax:1000"}


def decode(engine: Engine, prompts: list[list[int]], exit: str | None, tokens: int) -> tuple[list, float]:
    t = time.perf_counter()
    gens = [engine.generate(p, loops=LOOPS, exit=exit, max_new_tokens=tokens, temperature=0) for p in prompts]
    return gens, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt = Path(args.checkpoint) if args.checkpoint else trained_checkpoint(150)
    engine = Engine.from_checkpoint(ckpt, kv_cache="per-loop", device="cpu", dtype="float32")
    engine.stop_ids = set()  # every run writes the same number of tokens
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    n = len(prompts) * args.tokens

    def median_time(exit: str | None) -> tuple[list, float]:
        runs = [decode(engine, prompts, exit, args.tokens) for _ in range(args.repeats)]
        return runs[0][0], statistics.median(r[1] for r in runs)

    log("fixed loops")
    fixed, base = median_time(None)
    print(
        f"# exit criteria · {datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · {ckpt} · batch 1, greedy, {args.tokens} tokens × {len(prompts)} "
        f"prompts, at most {LOOPS} loops, per-loop cache, median of {args.repeats}"
    )
    print(
        f"{'criterion':<16} {'ms/token':>8} {'overhead':>8} {'mean loops':>10} {'tokens/s':>9} {'same tokens':>11}"
    )
    print(
        f"{'none (fixed 8)':<16} {1000 * base / n:>8.2f} {'-':>8} {LOOPS:>10.2f} {n / base:>9.1f} {'100%':>11}"
    )
    for name, never in NEVER.items():
        log(f"{name}: overhead")
        _, checked = median_time(never)
        spec = f"{name}:{DEFAULT_THRESHOLD[name]:g}"
        log(f"{spec}: at the default threshold")
        gens, seconds = median_time(spec)
        loops = statistics.mean(t for g in gens for t in g.loops[1:])
        same = sum(
            a == b
            for g, f in zip(gens, fixed, strict=True)
            for a, b in zip(g.token_ids, f.token_ids, strict=False)
        )
        print(
            f"{spec:<16} {1000 * seconds / n:>8.2f} {checked / base - 1:>+7.0%} {loops:>10.2f} "
            f"{n / seconds:>9.1f} {same / n:>10.0%}"
        )


if __name__ == "__main__":
    main()
