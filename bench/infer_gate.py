"""Ouro's exit gate as an exit that saves compute: mean loops and tokens/s at `--exit gate:P` against a fixed
4 loops, batch 1 and 8, greedy, KV-cached.

Ouro's own code computes every loop and then picks the exit step, so its gate saves nothing; here a token
that exits leaves the batch and its remaining loops are not run. The script converts the `ouro-tiny`
fixture (Ouro's code, random weights, with a spread exit distribution) and, for a size where loops cost
more than the per-token overhead, an Ouro-shaped model of width 512 with 4 layers whose gate is drawn at
random (bias −0.5, so that exits spread over the loops as in the fixture).

    .venv/bin/python bench/infer_gate.py      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name, log  # bench/common.py: bench/ is on sys.path when a script runs

import looped
from looped.infer.engine import Engine
from looped.interop.convert import convert

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ouro-tiny"


def ouro_shaped(width: int, layers: int, vocab: int) -> looped.LoopedLM:
    cfg = looped.ModelConfig(
        vocab_size=vocab,
        width=width,
        n_heads=width // 64,
        mlp="swiglu",
        block_norm="sandwich",
        rope_pairing="half",
        qk_norm=False,
        tie_embeddings=False,
        prelude_layers=0,
        core_layers=layers,
        coda_layers=0,
        loops=4,
        injection="none",
        prelude_norm=False,
        readout=False,
        final_norm="every-loop",
        exit_gate=True,
        max_seq_len=512,
    )
    torch.manual_seed(0)
    model = looped.LoopedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (the init zeroes output projections)
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        model.exit_gate.bias.fill_(-0.5)
    return model.eval()


def run(
    model: looped.LoopedLM, prompts: list[list[int]], exit: str | None, tokens: int
) -> tuple[float, float]:
    """(mean loops per decoded token, decoded tokens/s) of one greedy batch."""
    engine = Engine(model, kv_cache="per-loop")
    engine.generate(prompts, loops=4, exit=exit, max_new_tokens=2, temperature=0)  # warm-up
    t = time.perf_counter()
    gens = engine.generate(prompts, loops=4, exit=exit, max_new_tokens=tokens, temperature=0)
    seconds = time.perf_counter() - t
    loops = [x for g in gens for x in g.loops[1:]]  # the first token comes from the prefill (all loops)
    return statistics.mean(loops), sum(len(g.token_ids) for g in gens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = {}
    if FIXTURE.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            _, out = convert(FIXTURE, Path(tmp) / "ouro")
            models["ouro-tiny (w64, 2 layers)"] = looped.load(out)
    else:
        log(f"{FIXTURE} is absent: only the synthetic model runs")
    models["Ouro-shaped w512, 4 layers"] = ouro_shaped(512, 4, 4096)
    print(
        f"# Ouro gate exit · {datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · greedy, {args.tokens} tokens, per-loop KV cache, median of {args.repeats}"
    )
    print(f"{'model':<28} {'batch':>5} {'exit':>9} {'mean loops':>10} {'tokens/s':>9} {'speed-up':>8}")
    gen = torch.Generator().manual_seed(1)
    for name, model in models.items():
        for batch in (1, 8):
            prompts = torch.randint(1, model.cfg.vocab_size, (batch, 8), generator=gen).tolist()
            base = None
            for exit in (None, "gate:0.5", "gate:0.9"):
                log(f"{name}, batch {batch}, exit {exit}")
                runs = [run(model, prompts, exit, args.tokens) for _ in range(args.repeats)]
                loops, rate = runs[0][0], statistics.median(r[1] for r in runs)
                base = base or rate
                print(
                    f"{name:<28} {batch:>5} {exit or 'fixed 4':>9} {loops:>10.2f} {rate:>9.1f} {rate / base:>7.2f}×"
                )


if __name__ == "__main__":
    main()
