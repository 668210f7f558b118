"""Batch-1 decoding on the device runtime: looped.edge (ONNX Runtime, float32 and int8) against the Engine
(PyTorch eager) on the same checkpoint — tokens/s at each loop count, file sizes, and validation loss.

One run:
1. exports CHECKPOINT with `looped export onnx --quantize int8` into --out (unless an export is already
   there: --reexport redoes it), and reads the file sizes from its manifest;
2. measures validation loss at each loop count of --loops on --windows windows of the checkpoint's data:
   PyTorch, the float32 graphs and the int8 graphs (all in this process, same windows);
3. times greedy generation of --tokens tokens after a fixed prompt, batch 1, shared KV cache, for each
   system and loop count: one untimed call, then --rounds timed rounds, every configuration once per round
   so that drift hits all rows alike; medians. "tokens/s" is generated tokens over the whole call (prompt
   included); "ms/step" is the median time of one decode step (prelude + T core steps + coda; the Engine's
   decode_ms / steps).

Both runtimes get the same thread count (--threads, default 1: this machine's two cores are often shared).
The table names the CPU, the threads and how many CPUs other processes kept busy meanwhile.

    .venv/bin/python bench/edge_decode.py runs/demo/final          # ~3 minutes after `make demo`
    .venv/bin/python bench/edge_decode.py runs/demo/final --loops 1,4,8,16 --tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name, cpu_seconds, log  # bench/common.py: bench/ is on sys.path when a script runs

from looped import Engine, load
from looped.checkpoint import load_config_dir
from looped.data.loader import TokenData, val_windows
from looped.data.tokenizer import Tokenizer
from looped.edge import EdgeModel
from looped.eval import loss_by_loops
from looped.interop.onnx_export import MANIFEST, export_onnx

PROMPT = "KING HENRY.\nNow, lords, the time is come"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="export folder (default: runs/edge-bench/<checkpoint name>)")
    p.add_argument("--reexport", action="store_true")
    p.add_argument("--loops", default="1,4,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--windows", type=int, default=32, help="validation windows for the loss")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    return p.parse_args()


def _export(args: argparse.Namespace) -> Path:
    ckpt = Path(args.checkpoint)
    out = Path(args.out or Path("runs/edge-bench") / ckpt.parent.name)
    if args.reexport or not (out / MANIFEST).is_file():
        log(f"exporting {ckpt} → {out}")
        export_onnx(ckpt, out, quantize="int8")
    return out


def _losses(ckpt: Path, out: Path, loops: list[int], n: int) -> dict[str, dict[int, float]]:
    cfg = load_config_dir(ckpt)
    windows = val_windows(TokenData.open(cfg.data.path, verify=False), cfg.data.seq_len, n)
    log(f"loss on {len(windows)} windows × {cfg.data.seq_len} tokens")
    result = {"torch": loss_by_loops(load(ckpt), windows, loops, batch_size=8)}
    for variant in ("float32", "int8"):
        edge = EdgeModel(out, variant=variant)
        result[variant] = {t: edge.loss(windows.numpy(), t) for t in loops}
    return result


def _time_engine(engine: Engine, loops: int, tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    g = engine.generate(PROMPT, loops=loops, max_new_tokens=tokens, temperature=0)
    wall = time.perf_counter() - t0
    return len(g.token_ids) / wall, g.decode_ms / max(1, len(g.token_ids) - 1)


def _time_edge(edge: EdgeModel, loops: int, tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    pieces = list(edge.generate(PROMPT, loops=loops, max_new_tokens=tokens, temperature=0, kv_cache="shared"))
    wall = time.perf_counter() - t0
    return len(pieces) / wall, statistics.median(p.ms for p in pieces[1:])


def main() -> None:
    args = _args()
    loops = [int(t) for t in args.loops.split(",")]
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    out = _export(args)
    manifest = json.loads((out / MANIFEST).read_text())
    sizes = {
        "torch": (ckpt / "model.safetensors").stat().st_size,
        "float32": sum(
            g["bytes"]
            for n, g in manifest["graphs"].items()
            if n in ("prelude_cached", "core_step_cached", "coda_cached")
        ),
        "int8": sum(
            g["bytes"]
            for n, g in manifest["graphs"].items()
            if n in ("prelude_cached.int8", "core_step_cached.int8", "coda_cached.int8")
        ),
    }
    losses = _losses(ckpt, out, loops, args.windows)
    systems = {
        "torch": Engine(load(ckpt), Tokenizer.load(ckpt), kv_cache="shared"),
        "float32": EdgeModel(out, "float32", threads=args.threads),
        "int8": EdgeModel(out, "int8", threads=args.threads),
    }

    def once(name: str, t: int) -> tuple[float, float]:
        system = systems[name]
        return _time_engine(system, t, args.tokens) if name == "torch" else _time_edge(system, t, args.tokens)

    for name in systems:  # untimed warm-up of every configuration
        for t in loops:
            once(name, t)
    busy0 = cpu_seconds()
    start = time.perf_counter()
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for name in systems:
            for t in loops:
                runs.setdefault((name, t), []).append(once(name, t))
    busy1 = cpu_seconds()
    wall = time.perf_counter() - start
    others = ((busy1[0] - busy0[0]) - (busy1[1] - busy0[1])) / wall
    rows = []
    for (name, t), values in runs.items():
        rows.append(
            {
                "system": {
                    "torch": "Engine (PyTorch)",
                    "float32": "looped.edge float32",
                    "int8": "looped.edge int8",
                }[name],
                "loops": t,
                "tokens_per_s": statistics.median(v[0] for v in values),
                "ms_per_step": statistics.median(v[1] for v in values),
                "mib": sizes[name] / 2**20,
                "loss": losses[name][t],
            }
        )
    head = (
        f"# edge_decode · {datetime.date.today()} · {cpu_name()} · {args.threads} thread(s) · "
        f"{args.tokens} tokens after a {len(Tokenizer.load(ckpt).encode(PROMPT))}-token prompt · "
        f"median of {args.rounds} · other processes kept {max(others, 0):.2f} CPUs busy"
    )
    print(head)
    print(f"{'system':<22} {'loops':>5} {'tokens/s':>9} {'ms/step':>8} {'MiB':>7} {'val loss':>9}")
    for row in rows:
        print(
            f"{row['system']:<22} {row['loops']:>5} {row['tokens_per_s']:>9.1f} {row['ms_per_step']:>8.2f} "
            f"{row['mib']:>7.2f} {row['loss']:>9.4f}"
        )
    fp = {r["loops"]: r["tokens_per_s"] for r in rows if r["system"].startswith("Engine")}
    for name in ("looped.edge float32", "looped.edge int8"):
        ratio = ", ".join(
            f"T={r['loops']} {r['tokens_per_s'] / fp[r['loops']]:.2f}×" for r in rows if r["system"] == name
        )
        print(f"{name} / Engine tokens/s: {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
