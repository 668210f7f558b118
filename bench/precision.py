"""bf16 against fp32 on this machine: a training step (bf16 autocast, as `train.precision = "bf16"` runs it)
and a batch-1 KV-cached decode step (bf16 weights, as `--dtype bfloat16` loads them).

Whether bf16 pays on a CPU depends on the CPU: with AVX-512 BF16 or AMX a bf16 matmul can beat fp32, with
AVX2 only it is many times slower. So the script reports the CPU's flags next to every figure, and measures
its reference in the same run: the GFLOP/s of a 1024² matmul in each dtype. Rounds alternate fp32 and bf16
so that drift in the machine's load hits both alike; medians over rounds.

    .venv/bin/python bench/precision.py            # demo-sized and width-512 models: ~3 minutes on 2 cores
    .venv/bin/python bench/precision.py --quick    # a tiny model, for a smoke run: ~15 seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time

import torch
from common import cpu_name, cpu_seconds, log  # bench/common.py: bench/ is on sys.path when a script runs

from looped import Engine, LoopedLM, ModelConfig

SETTINGS = {
    # configs/demo.toml's shape: width 192, 1/2/1 layers, 4,096 tokens.
    "demo": dict(
        model=dict(vocab_size=4096, width=192, n_heads=3, prelude_layers=1, core_layers=2, coda_layers=1),
        batch=16,
        seq=256,
    ),
    "w512": dict(
        model=dict(vocab_size=4096, width=512, n_heads=4, prelude_layers=2, core_layers=2, coda_layers=2),
        batch=8,
        seq=256,
    ),
    "quick": dict(
        model=dict(vocab_size=256, width=64, n_heads=2, prelude_layers=1, core_layers=2, coda_layers=1),
        batch=2,
        seq=32,
    ),
}
LOOPS, BACKPROP_LOOPS, DECODE_TOKENS = 4, 2, 32


def cpu_flags() -> str:
    """The CPU's matrix-relevant instruction sets (AVX2, AVX-512 BF16, AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    keep = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    return " ".join(keep) or "none of avx2/avx512/amx"


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def model_config(setting: dict) -> ModelConfig:
    return ModelConfig(**setting["model"], mlp="relu2", loops=LOOPS, max_seq_len=max(256, setting["seq"]))


def train_step_seconds(model: LoopedLM, opt, tokens: torch.Tensor, bf16: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t = time.perf_counter()
    with context:
        loss = model(tokens[:, :-1], labels=tokens[:, 1:], loops=LOOPS, backprop_loops=BACKPROP_LOOPS).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def decode_ms_per_token(engine: Engine, prompt: list[int]) -> float:
    g = engine.generate(prompt, loops=LOOPS, max_new_tokens=DECODE_TOKENS, temperature=0)
    return g.decode_ms / max(1, len(g.token_ids) - 1)


def measure(name: str, setting: dict, rounds: int) -> dict:
    cfg = model_config(setting)
    torch.manual_seed(0)
    model = LoopedLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (setting["batch"], setting["seq"] + 1))
    fp32_eval = LoopedLM(cfg).eval()
    bf16_eval = LoopedLM(cfg).to(torch.bfloat16).eval()
    bf16_eval.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32_eval.state_dict().items()})
    engines = {"fp32": Engine(fp32_eval, kv_cache="shared"), "bf16": Engine(bf16_eval, kv_cache="shared")}
    prompt = tokens[0, :16].tolist()
    for bf16 in (False, True):  # warm-up: first calls pay for allocation and kernel selection
        train_step_seconds(model, opt, tokens, bf16)
        decode_ms_per_token(engines["bf16" if bf16 else "fp32"], prompt)
    train = {"fp32": [], "bf16": []}
    decode = {"fp32": [], "bf16": []}
    for r in range(rounds):
        log(f"{name}: round {r + 1}/{rounds}")
        for key in ("fp32", "bf16"):
            train[key].append(train_step_seconds(model, opt, tokens, key == "bf16"))
            decode[key].append(decode_ms_per_token(engines[key], prompt))
    train_ms = {k: 1e3 * statistics.median(v) for k, v in train.items()}
    decode_ms = {k: statistics.median(v) for k, v in decode.items()}
    return dict(
        setting=name,
        width=cfg.width,
        layers=f"{cfg.prelude_layers}/{cfg.core_layers}/{cfg.coda_layers}",
        batch=setting["batch"],
        seq=setting["seq"],
        train_ms=train_ms,
        decode_ms=decode_ms,
        train_speedup=train_ms["fp32"] / train_ms["bf16"],
        decode_speedup=decode_ms["fp32"] / decode_ms["bf16"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    names = ["quick"] if args.quick else ["demo", "w512"]
    (everyone0, own0), wall0 = cpu_seconds(), time.perf_counter()
    ref = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    results = [measure(n, SETTINGS[n], 2 if args.quick else args.rounds) for n in names]
    (everyone1, own1), wall1 = cpu_seconds(), time.perf_counter()
    other = max(0.0, (everyone1 - everyone0) - (own1 - own0)) / (wall1 - wall0)
    print(
        f"{datetime.date.today()} · {cpu_name()} · flags: {cpu_flags()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · other processes used {other:.2f} cores on average"
    )
    print(
        f"1024² matmul: fp32 {ref['fp32']:.0f} GFLOP/s, bf16 {ref['bf16']:.0f} GFLOP/s "
        f"(bf16/fp32 = {ref['bf16'] / ref['fp32']:.2f}×)"
    )
    print(
        f"training step: bf16 autocast, loops {LOOPS}, k {BACKPROP_LOOPS}; decode: batch 1, loops {LOOPS}, "
        f"{DECODE_TOKENS} tokens, shared KV cache; medians of alternating rounds"
    )
    head = f"{'model':<22} {'train fp32 ms':>13} {'train bf16 ms':>13} {'speed-up':>8} "
    print(head + f"{'decode fp32 ms':>14} {'decode bf16 ms':>14} {'speed-up':>8}")
    for r in results:
        label = f"w{r['width']} {r['layers']} {r['batch']}×{r['seq']}"
        print(
            f"{label:<22} {r['train_ms']['fp32']:>13.1f} {r['train_ms']['bf16']:>13.1f} "
            f"{r['train_speedup']:>7.2f}× {r['decode_ms']['fp32']:>14.2f} {r['decode_ms']['bf16']:>14.2f} "
            f"{r['decode_speedup']:>7.2f}×"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(cpu=cpu_name(), flags=cpu_flags(), matmul=ref, results=results, other_cores=other),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
