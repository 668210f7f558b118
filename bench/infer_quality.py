"""What the shared KV cache and adaptive exit cost in quality, on a trained checkpoint.

On the first validation windows of a prepared dataset (token ids only; nothing is decoded to text):
1. KV-cache rule. Teacher-forced cached decoding: every window is a row of one KVCache; its first token is
   prefilled, the rest are fed one at a time through `forward_cached(model, cache, ids, loops=T)`, and the
   next-token logits at each position are collected. Per T: the validation loss with kv_cache "per-loop"
   and "shared", the uncached `model(x, loops=T)` loss (which per-loop must equal: the largest logit
   difference is printed), and the agreement of the two rules' argmax tokens at each position (the main
   figure: it does not compound). Also free-running greedy generation with the Engine (64 new tokens after
   32-token prompts, all prompts in one call) under each rule: the fraction of tokens that match up to each
   sequence's first divergence, and overall.
2. Adaptive exit. For each criterion and threshold, at most 8 and 16 loops: mean loops per token and the
   agreement with fixed loops at that maximum (same KV rule), teacher-forced (argmax per position, as above;
   also the loss) and free-running (the Engine's greedy tokens; up to the first divergence and overall).
   A setting meets the target when it cuts mean loops by ≥ 30 % with ≥ 99 % token agreement.

    .venv/bin/python bench/infer_quality.py                 # runs/demo/final, 16 windows of 128: ~5 minutes
    .venv/bin/python bench/infer_quality.py --quick         # 4 windows of 64, fewer settings: ~30 seconds
    .venv/bin/python bench/infer_quality.py CKPT --data DIR --loops 1,4,16 --windows 32 --json out.json

It runs one torch thread unless --threads says otherwise: the figures do not depend on it, only the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import log  # bench/common.py: bench/ is on sys.path when a script runs

import looped
from looped.checkpoint import load_config_dir
from looped.data.loader import TokenData, val_windows
from looped.infer.cache import KVCache
from looped.infer.engine import Engine
from looped.infer.exit import parse_exit
from looped.infer.forward import forward_cached
from looped.model.lm import LoopedLM

PROMPT = 32
MODES = ("per-loop", "shared")
EXITS = ("kl:1e-4", "kl:3e-4", "kl:1e-3", "kl:3e-3", "entropy:1e-3", "entropy:1e-2")
EXITS += ("state:1e-3", "state:1e-2", "state:3e-2", "argmax:2", "argmax:3")
QUICK_EXITS = ("kl:1e-3", "entropy:1e-2", "state:1e-2", "argmax:2")
CUT, AGREE = 0.30, 0.99  # the target: mean loops cut by ≥ 30 % with ≥ 99 % token agreement


def teacher_forced(
    model: LoopedLM, x: torch.Tensor, loops: int, mode: str, exit: str | None = None, min_loops: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed x (B, S) one position at a time through a KVCache; returns next-token logits (B, S, V) and the
    loops each position ran (B, S)."""
    B, S = x.shape
    cache = KVCache(model.cfg, mode, rows=B, slots=S)
    logits, used = [], []
    for p in range(S):  # position 0 is the prefill of a 1-token prompt: the same call
        out = forward_cached(
            model, cache, x[:, p : p + 1], loops=loops, exit=parse_exit(exit), min_loops=min_loops
        )
        logits.append(out.logits)
        used.append(out.loops)
    return torch.stack(logits, 1), torch.stack(used, 1)


def loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))


def greedy(engine: Engine, prompts: list[list[int]], loops: int, new: int, **kw) -> list:
    return engine.generate(prompts, loops=loops, max_new_tokens=new, temperature=0, **kw)


def agreement(runs: list, refs: list) -> tuple[float, float]:
    """(tokens matching up to each sequence's first divergence, tokens matching anywhere) ÷ all tokens."""
    prefix = overall = total = 0
    for g, ref in zip(runs, refs, strict=True):
        a, b = g.token_ids, ref.token_ids
        same = [u == v for u, v in zip(a, b, strict=True)]
        prefix += same.index(False) if False in same else len(same)
        overall += sum(same)
        total += len(same)
    return prefix / total, overall / total


def mean_loops(runs: list) -> float:
    loops = [t for g in runs for t in g.loops]
    return sum(loops) / len(loops)


def kv_rules(model: LoopedLM, windows: torch.Tensor, loops: list[int], new: int) -> tuple[list[dict], dict]:
    """Part 1: per T, losses and agreement of the two KV rules; returns the rows and the per-loop and shared
    teacher-forced logits and generations by (mode, T), for part 2 to reuse."""
    x, y = windows[:, :-1], windows[:, 1:]
    prompts = windows[:, :PROMPT].tolist()
    rows, keep = [], {}
    for t in loops:
        log(f"kv rules: loops {t}")
        plain = model(x, loops=t).logits
        tf = {m: teacher_forced(model, x, t, m)[0] for m in MODES}
        gens = {m: greedy(Engine(model, kv_cache=m), prompts, t, new) for m in MODES}
        keep.update({(m, t): (tf[m], gens[m]) for m in MODES})
        prefix, overall = agreement(gens["shared"], gens["per-loop"])
        rows.append(
            dict(
                loops=t,
                loss_uncached=loss(plain, y),
                loss_per_loop=loss(tf["per-loop"], y),
                loss_shared=loss(tf["shared"], y),
                max_diff_per_loop_vs_uncached=float((tf["per-loop"] - plain).abs().max()),
                tf_agreement=float((tf["shared"].argmax(-1) == tf["per-loop"].argmax(-1)).float().mean()),
                free_prefix_agreement=prefix,
                free_agreement=overall,
            )
        )
    return rows, keep


def adaptive(
    model: LoopedLM,
    windows: torch.Tensor,
    mode: str,
    exits: tuple[str, ...],
    max_loops: list[int],
    min_loops: int,
    new: int,
    keep: dict,
) -> list[dict]:
    """Part 2: every exit setting against fixed loops at its maximum, with the same KV rule."""
    x, y = windows[:, :-1], windows[:, 1:]
    prompts = windows[:, :PROMPT].tolist()
    rows = []
    for t_max in max_loops:
        if (mode, t_max) not in keep:
            log(f"adaptive: fixed reference at {t_max} loops")
            keep[(mode, t_max)] = (
                teacher_forced(model, x, t_max, mode)[0],
                greedy(Engine(model, kv_cache=mode), prompts, t_max, new),
            )
        ref_logits, ref_gens = keep[(mode, t_max)]
        ref_tokens = ref_logits.argmax(-1)
        for spec in exits:
            log(f"adaptive: {spec}, at most {t_max} loops")
            tf_logits, tf_used = teacher_forced(model, x, t_max, mode, spec, min_loops)
            gens = greedy(Engine(model, kv_cache=mode), prompts, t_max, new, exit=spec, min_loops=min_loops)
            prefix, overall = agreement(gens, ref_gens)
            row = dict(
                exit=spec,
                max_loops=t_max,
                min_loops=min_loops,
                tf_mean_loops=float(tf_used.float().mean()),
                tf_agreement=float((tf_logits.argmax(-1) == ref_tokens).float().mean()),
                tf_loss=loss(tf_logits, y),
                tf_loss_fixed=loss(ref_logits, y),
                free_mean_loops=mean_loops(gens),
                free_prefix_agreement=prefix,
                free_agreement=overall,
            )
            row["tf_cut"] = 1 - row["tf_mean_loops"] / t_max
            row["free_cut"] = 1 - row["free_mean_loops"] / t_max
            row["meets_tf"] = row["tf_cut"] >= CUT and row["tf_agreement"] >= AGREE
            row["meets_free"] = row["free_cut"] >= CUT and row["free_prefix_agreement"] >= AGREE
            rows.append(row)
    return rows


def pct_pair(a: float, b: float) -> str:
    return f"{100 * a:6.2f}% / {100 * b:6.2f}%"  # 17 characters


def print_tables(r: dict) -> None:
    s = r["setting"]
    print(
        f"{r['date']}  {r['checkpoint']} (width {s['width']}, {s['layers']} layers, trained at mean loops "
        f"{s['mean_loops']:g}), torch {r['torch']}, float32"
    )
    print(
        f"{r['data']}: first {s['windows']} validation windows of {s['seq_len']} tokens (teacher-forced); "
        f"free-running: their first {PROMPT} tokens as prompts, {s['new_tokens']} greedy tokens\n"
    )
    print("1. KV-cache rule: teacher-forced loss, and agreement of shared with per-loop")
    head = (
        f"{'loops':>5} {'uncached':>8} {'per-loop':>8} {'shared':>8} {'Δ shared':>8} "
        f"{'tf agree':>8} {'free agree prefix/all':>21} {'max |per-loop − uncached|':>25}"
    )
    print(head + "\n" + "-" * len(head))
    for x in r["kv_rules"]:
        print(
            f"{x['loops']:>5} {x['loss_uncached']:8.4f} {x['loss_per_loop']:8.4f} {x['loss_shared']:8.4f} "
            f"{x['loss_shared'] - x['loss_per_loop']:+8.4f} {100 * x['tf_agreement']:7.2f}% "
            f"{pct_pair(x['free_prefix_agreement'], x['free_agreement']):>21} "
            f"{x['max_diff_per_loop_vs_uncached']:25.1e}"
        )
    print(
        f"\n2. Adaptive exit (kv_cache {r['exit_kv_cache']}, min_loops {r['adaptive'][0]['min_loops']}) "
        f"against fixed loops at its maximum; target: mean loops cut ≥ {CUT:.0%} with ≥ {AGREE:.0%} agreement"
        if r["adaptive"]
        else ""
    )
    head = (
        f"{'exit':<12} {'max':>3} {'tf loops':>8} {'cut':>4} {'tf agree':>8} {'tf loss exit/fixed':>18} "
        f"{'free loops':>10} {'cut':>4} {'free agree prefix/all':>21} {'meets tf/free':>13}"
    )
    print(head + "\n" + "-" * len(head))
    for x in r["adaptive"]:
        meets = f"{'yes' if x['meets_tf'] else 'no'}/{'yes' if x['meets_free'] else 'no'}"
        print(
            f"{x['exit']:<12} {x['max_loops']:>3} {x['tf_mean_loops']:8.2f} {100 * x['tf_cut']:3.0f}% "
            f"{100 * x['tf_agreement']:7.2f}% {x['tf_loss']:8.4f} / {x['tf_loss_fixed']:7.4f} "
            f"{x['free_mean_loops']:10.2f} {100 * x['free_cut']:3.0f}% "
            f"{pct_pair(x['free_prefix_agreement'], x['free_agreement']):>21} {meets:>13}"
        )
    print(
        "\ntf: teacher-forced, argmax at each position (errors do not compound); free: the Engine's greedy "
        "tokens, agreement up to each sequence's first divergence / anywhere"
    )
    for kind in ("tf", "free"):
        ok = [f"{x['exit']}@{x['max_loops']}" for x in r["adaptive"] if x[f"meets_{kind}"]]
        print(f"meet the target ({kind} agreement): {', '.join(ok) if ok else 'none'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?", default="runs/demo/final", help="checkpoint directory")
    p.add_argument("--data", default="data/shakespeare", help="prepared dataset (its val split is used)")
    p.add_argument("--loops", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--windows", type=int, default=None, help="validation windows (default 16; quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default 128; quick 64)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="greedy tokens per prompt (default 64; quick 16)"
    )
    p.add_argument("--max-loops", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="adaptive exit's maxima (default 8,16; quick 8)")  # fmt: skip
    p.add_argument(
        "--min-loops", type=int, default=1, help="adaptive exit's minimum (exit is checked from 2)"
    )
    p.add_argument("--kv-cache", choices=MODES, default="shared", help="KV rule of the adaptive-exit runs")
    p.add_argument("--quick", action="store_true", help="fewer windows, shorter, one threshold per criterion")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads; they change only the time (default 1)"
    )
    args = p.parse_args(argv)
    # One thread by default: the figures do not depend on it, and on a shared machine two threads that wait
    # for each other at every small op can run 10-100× slower than one.
    torch.set_num_threads(args.threads)
    windows_n = args.windows or (4 if args.quick else 16)
    seq_len = args.seq_len or (64 if args.quick else 128)
    new = args.new_tokens or (16 if args.quick else 64)
    max_loops = args.max_loops or ([8] if args.quick else [8, 16])
    exits = QUICK_EXITS if args.quick else EXITS

    start = time.perf_counter()
    torch.set_grad_enabled(False)
    model = looped.load(args.ckpt).eval()
    cfg = load_config_dir(args.ckpt)  # for the training mean loops
    data = TokenData.open(args.data)
    if data.tokenizer.vocab_size != model.cfg.vocab_size:
        raise SystemExit(
            f"{args.data} has {data.tokenizer.vocab_size} token ids, the model {model.cfg.vocab_size}"
        )
    if max(seq_len, PROMPT + new) > model.cfg.max_seq_len:
        raise SystemExit(f"windows and generations must fit the model's context of {model.cfg.max_seq_len}")
    windows = val_windows(data, seq_len, windows_n)
    rows, keep = kv_rules(model, windows, args.loops, new)
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        checkpoint=str(args.ckpt),
        data=str(args.data),
        torch=torch.__version__,
        setting=dict(
            width=model.cfg.width,
            layers=f"{model.cfg.prelude_layers}/{model.cfg.core_layers}/{model.cfg.coda_layers}",
            mean_loops=cfg.loops.mean_loops,
            windows=len(windows),
            seq_len=seq_len,
            new_tokens=new,
        ),
        kv_rules=rows,
        exit_kv_cache=args.kv_cache,
        adaptive=adaptive(model, windows, args.kv_cache, exits, max_loops, args.min_loops, new, keep),
    )
    report["seconds"] = time.perf_counter() - start
    print_tables(report)
    log(f"done in {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
