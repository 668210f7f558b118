"""Decode speed and KV-cache memory of the looped Engine against Hugging Face transformers' Llama, per dtype.

One run measures, on the same machine load, in each dtype of --dtypes (float32 and bfloat16 by default;
`auto` is what `looped.precision.fastest_dtype` picks on this CPU):
- the looped model: width 512, 8 heads, 2/2/2 layers, vocabulary 4096, ModelConfig's default MLP
  (relu2 at 4·width), random init, eval; `Engine(model, kv_cache=...).generate(prompts, loops=T,
  max_new_tokens=N, temperature=0)` for kv_cache "shared" and "per-loop", loops 1, 4, 8, 16, batch 1 and 16
  (16 prompts in one call);
- the reference, `transformers.LlamaForCausalLM` with the same width and heads, a SwiGLU MLP whose hidden size
  gives the same MLP parameters per layer, tied embeddings, and 2 + 2T + 2 layers: the number of blocks the
  looped model runs per token at T loops, so FLOPs per token match (12 layers for T = 4);
  `model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)` with its default DynamicCache
  and attention (sdpa), in the same dtype as the looped row it is compared with.
Prompts are 32 random tokens. Every configuration gets one untimed call, then one timed call per round,
all configurations in each round so that drift hits every row alike; the table shows medians over rounds.
tokens/s is generated tokens / wall time of the whole generate call; decode tokens/s leaves out the
prefill (looped: the Engine's prefill_ms and decode_ms; Llama: the time of a 1-token call subtracted).

FLOPs per token are forward matmul FLOPs with attention counted dense (`looped.model.accounting`'s
convention), averaged over the generated tokens' context lengths 33..32+N; the Llama figure is computed here
as 2·(layers·(4·d² + 3·d·hidden) + d·vocab) + layers·4·context·d, and both formulas are checked against
torch's FlopCounterMode on one forward pass. KV bytes per token: looped from
`model.kv_cache_bytes_per_token` (checked against a filled `KVCache.used_bytes()`), Llama
2·layers·kv_heads·head_dim·bytes (checked against the DynamicCache generate returns).

Why a dtype axis: at batch 1 a decode step reads every weight it multiplies by, so a standard model of equal
FLOPs streams 2 + 2T + 2 distinct layers from memory per token while the looped model reads its 2 core layers
T times, from the CPU's cache when they fit (in bf16 the core of this model is 12.6 MB). The table's
"cache-resident speed-up" line gives, per dtype, the looped model's tokens/s over the FLOP-matched Llama's at
each loop count (batch 1, shared cache): how much of the loop count's extra depth the cache absorbs.

The "matmul-only bound" line times nothing but the batch-1 matrix products of one decode step of each
system (the same weights, in the same order, back to back): the ratio a step free of every other cost
(norms, attention, dispatch) would reach, so the table shows how much of the gap to it is overhead.

With --accuracy CHECKPOINT, bf16 is also checked against float32 on a trained checkpoint (a random model's
near-uniform logits say nothing about greedy tokens): the largest |logit difference| and the mean KL over
teacher-forced text, and how many greedy tokens agree, at each loop count of the run.

    .venv/bin/python bench/infer_decode.py                    # 64 new tokens, 3 rounds, fp32 + bf16: ~16 minutes on 2 cores
    .venv/bin/python bench/infer_decode.py --quick            # 16 new tokens, 1 round: ~4 minutes
    .venv/bin/python bench/infer_decode.py --threads 1 --json out.json   # when other jobs share the cores
    .venv/bin/python bench/infer_decode.py --dtypes bfloat16 --loops 8 --batches 1 --quick   # the target row only

Both systems run with the same torch thread count (default: torch's). On a machine whose cores are busy with
other work, threads that wait for each other at every small op make both 10-100× slower and the ratios
noise; the table says how many CPUs other processes kept busy, and --threads 1 avoids the problem.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name, cpu_seconds, log  # bench/common.py: bench/ is on sys.path when a script runs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import looped
from looped import LoopedLM, ModelConfig
from looped.infer.cache import KVCache
from looped.infer.engine import Engine
from looped.infer.forward import forward_cached
from looped.precision import cpu_flags, fastest_dtype

MODEL = dict(
    width=512, n_heads=8, prelude_layers=2, core_layers=2, coda_layers=2, vocab_size=4096, max_seq_len=1024
)
PROMPT = 32
LOOPS = (1, 4, 8, 16)
BATCHES = (1, 16)
MODES = ("shared", "per-loop")
MATCH_LOOPS = 4  # the loops of the key comparison (a)
RESIDENT_LOOPS = 8  # the loops of the cache-resident target (c)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACCURACY_PROMPTS = [
    "the king",
    "Once upon a time",
    "a dog ran",
    "In the beginning",
    "She said that",
    "The city of",
    "When he",
    "It was a",
]


# ---------------------------------------------------------------------------------------------- models
def llama(cfg: ModelConfig, layers: int):
    """A LlamaForCausalLM as wide as `cfg`, SwiGLU sized to the same MLP parameters per layer, `layers` deep."""
    from transformers import LlamaConfig, LlamaForCausalLM

    mlp_params = (3 if cfg.mlp == "swiglu" else 2) * cfg.width * cfg.resolved_mlp_hidden
    hc = LlamaConfig(
        hidden_size=cfg.width,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.resolved_n_kv_heads,
        head_dim=cfg.resolved_head_dim,
        intermediate_size=round(mlp_params / (3 * cfg.width)),
        num_hidden_layers=layers,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_base,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(hc).eval()


def llama_flops_per_token(hc, seq_len: int) -> float:
    """Forward matmul FLOPs per token of a Llama at context `seq_len`, attention dense (accounting's rule)."""
    d, n, hd, kv = hc.hidden_size, hc.num_attention_heads, hc.head_dim, hc.num_key_value_heads
    layer = d * n * hd * 2 + d * kv * hd * 2 + 3 * d * hc.intermediate_size  # q, o; k, v; gate, up, down
    return float(
        2 * (hc.num_hidden_layers * layer + d * hc.vocab_size) + hc.num_hidden_layers * 4 * seq_len * n * hd
    )


def mean_over_context(flops, new_tokens: int) -> float:
    """`flops(seq_len)` averaged over the generated tokens' contexts, as `Generation.flops_per_token` does."""
    return statistics.fmean(flops(PROMPT + i + 1) for i in range(new_tokens))


def flop_counter(fn) -> int:
    # The MATH backend runs attention as bmm, which FlopCounterMode counts (the CPU flash kernel it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def check_flops(model: LoopedLM, hf) -> dict:
    """Formula ÷ FlopCounterMode for one uncached forward of 96 tokens (dense attention: per token 4·S·h·hd)."""
    S = 96
    ids = torch.randint(0, model.cfg.vocab_size, (1, S))
    ours = flop_counter(lambda: model(ids, loops=MATCH_LOOPS)) / S
    ref = flop_counter(lambda: hf(ids)) / S
    return dict(
        looped=model.flops_per_token(MATCH_LOOPS, S) / ours, llama=llama_flops_per_token(hf.config, S) / ref
    )


def kv_bytes_looped(model: LoopedLM, loops: int, mode: str, tokens: int) -> dict:
    """KV bytes per token by formula, and measured: a KVCache filled with `tokens` tokens at `loops`."""
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, mode, rows=1, slots=tokens, dtype=dtype)
    forward_cached(model, cache, torch.randint(0, model.cfg.vocab_size, (1, tokens)), loops=loops)
    formula = model.kv_cache_bytes_per_token(loops, dtype, shared=mode == "shared")
    return dict(formula=formula, measured=cache.used_bytes() / tokens)


def kv_bytes_llama(hf, prompts: torch.Tensor) -> dict:
    """KV bytes per token by formula, and measured in the DynamicCache of a 4-token generate."""
    hc = hf.config
    size = next(hf.parameters()).element_size()
    formula = 2 * hc.num_hidden_layers * hc.num_key_value_heads * hc.head_dim * size
    out = hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = prompts.shape[0] * cache.get_seq_length()
    return dict(formula=formula, measured=nbytes / tokens)


# ---------------------------------------------------------------------------------------------- matmul bound
def looped_weights(model: LoopedLM, loops: int) -> list[torch.Tensor]:
    """The weight matrices a batch-1 decode step of `model` multiplies by, in the order it does (the head last)."""

    def block(b) -> list[torch.Tensor]:
        mods = [b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo, b.mlp.w_in, b.mlp.w_gate, b.mlp.w_out]
        return [m.weight for m in mods if m is not None]

    out = [w for b in model.prelude for w in block(b)]
    if getattr(model.injection, "B", None) is not None:
        out.append(model.injection.B.weight)
    out += [w for _ in range(loops) for b in model.core for w in block(b)]
    if model.readout is not None:
        out.append(model.readout.weight)
    return out + [w for b in model.coda for w in block(b)] + [model.head.weight]


def llama_weights(hf) -> list[torch.Tensor]:
    out = []
    for layer in hf.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
        out += [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    return out + [hf.lm_head.weight]


@torch.inference_mode()
def matmul_bound(model: LoopedLM, hf, loops: int, reps: int = 7) -> float:
    """Llama's time ÷ the looped model's for nothing but the batch-1 products of one decode step, back to back:
    the tokens/s ratio a decode step without any other cost (norms, attention, dispatch) would reach. It
    measures the weights' traffic as the step sees it: the looped core read T times (from cache when it
    stays there), every Llama layer once."""
    dtype = next(model.parameters()).dtype
    mats = {"looped": looped_weights(model, loops), "llama": llama_weights(hf)}
    inputs = {n: torch.randn(1, n, dtype=dtype) for w in mats["looped"] + mats["llama"] for n in [w.shape[1]]}
    times: dict[str, list[float]] = {"looped": [], "llama": []}
    for r in range(reps + 1):  # the first round warms up
        for name, ws in mats.items():
            t = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            if r:
                times[name].append(time.perf_counter() - t)
    return statistics.median(times["llama"]) / statistics.median(times["looped"])


# ---------------------------------------------------------------------------------------------- timing
class LoopedRow:
    """One looped configuration: an Engine of its own (per-loop caches keep the loop groups they grew)."""

    def __init__(self, model: LoopedLM, mode: str, loops: int, prompts: list[list[int]], new: int) -> None:
        self.system, self.mode, self.depth, self.batch = "looped", mode, loops, len(prompts)
        self.dtype = dtype_name(next(model.parameters()).dtype)
        self.engine = Engine(model, kv_cache=mode)
        self.prompts, self.new = prompts, new
        self.times: list[float] = []
        self.decode_rates: list[float] = []
        self.flops = 0.0

    def run(self, timed: bool) -> None:
        t = time.perf_counter()
        out = self.engine.generate(self.prompts, loops=self.depth, max_new_tokens=self.new, temperature=0)
        seconds = time.perf_counter() - t
        assert all(len(g.token_ids) == self.new for g in out), "a sequence stopped early"
        self.flops = out[0].flops_per_token
        if timed:
            self.times.append(seconds)
            self.decode_rates.append(self.batch * (self.new - 1) / (out[0].decode_ms / 1000))


class LlamaRow:
    """One Llama configuration; a 1-token call per round estimates the prefill to leave out."""

    def __init__(self, hf, prompts: torch.Tensor, new: int) -> None:
        self.system, self.mode, self.depth, self.batch = (
            "HF Llama",
            "dynamic",
            hf.config.num_hidden_layers,
            len(prompts),
        )
        self.dtype = dtype_name(next(hf.parameters()).dtype)
        self.hf, self.prompts, self.new = hf, prompts, new
        self.times: list[float] = []
        self.prefill: list[float] = []
        self.decode_rates: list[float] = []
        self.flops = mean_over_context(lambda s: llama_flops_per_token(hf.config, s), new)

    def _generate(self, new: int) -> float:
        t = time.perf_counter()
        out = self.hf.generate(
            self.prompts,
            attention_mask=torch.ones_like(self.prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
        seconds = time.perf_counter() - t
        assert out.shape[1] == self.prompts.shape[1] + new
        return seconds

    def run(self, timed: bool) -> None:
        seconds, prefill = self._generate(self.new), self._generate(1)
        if timed:
            self.times.append(seconds)
            self.prefill.append(prefill)
            self.decode_rates.append(self.batch * (self.new - 1) / max(seconds - prefill, 1e-9))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtypes(text: str) -> list[torch.dtype]:
    """ "float32,bfloat16", or "auto" for the dtype `looped.precision.fastest_dtype` picks here."""
    out = []
    for name in (v.strip() for v in text.split(",") if v.strip()):
        if name not in (*DTYPES, "auto"):
            raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}, auto")
        dtype = fastest_dtype("cpu") if name == "auto" else DTYPES[name]
        if dtype not in out:
            out.append(dtype)
    return out


def build_rows(
    model: LoopedLM, hfs: dict, prompts: torch.Tensor, args: argparse.Namespace, new: int
) -> list[LoopedRow | LlamaRow]:
    """Every configuration of one dtype: the Llama references, then the looped model per cache and loops."""
    rows: list[LoopedRow | LlamaRow] = []
    for b in args.batches:
        for hf in hfs.values():
            rows.append(LlamaRow(hf, prompts[:b], new))
        for mode in MODES:
            for t in args.loops:
                rows.append(LoopedRow(model, mode, t, prompts[:b].tolist(), new))
    return rows


def measure(args: argparse.Namespace) -> dict:
    cfg = ModelConfig(**MODEL)
    torch.manual_seed(0)
    model = LoopedLM(cfg).eval()
    new, rounds = (16, 1) if args.quick else (args.new_tokens, args.rounds)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (max(args.batches), PROMPT), generator=gen)
    # The FLOP-matched standard depth at T loops, from the library's own matching (2 + 2T + 2 here).
    match = {
        t: looped.baseline(cfg, match="flops", loops=t, seq_len=PROMPT + new).n_layers for t in args.loops
    }
    log(f"building Llama references with {sorted(set(match.values()))} layers")
    hfs = {n: llama(cfg, n) for n in sorted(set(match.values()))}
    flops_check = check_flops(
        model, hfs[match[MATCH_LOOPS]] if MATCH_LOOPS in match else next(iter(hfs.values()))
    )
    # The same weights in every dtype (a bf16 copy rounds the float32 ones), for both systems.
    models = {d: model if d == torch.float32 else copy.deepcopy(model).to(d) for d in args.dtypes}
    hfs_by = {
        d: {n: hf if d == torch.float32 else copy.deepcopy(hf).to(d) for n, hf in hfs.items()}
        for d in args.dtypes
    }
    rows = [r for d in args.dtypes for r in build_rows(models[d], hfs_by[d], prompts, args, new)]

    tokens = PROMPT + new
    kv = {
        (dtype_name(d), m, t): kv_bytes_looped(models[d], t, m, tokens)
        for d in args.dtypes
        for m in MODES
        for t in args.loops
    }
    with torch.inference_mode():
        kv_hf = {
            (dtype_name(d), n): kv_bytes_llama(hf, prompts[:1])
            for d in args.dtypes
            for n, hf in hfs_by[d].items()
        }
        for i, row in enumerate(rows):
            log(
                f"warm-up {i + 1}/{len(rows)}: {row.dtype} {row.system} {row.mode} {row.depth} batch {row.batch}"
            )
            row.run(timed=False)
        (everyone0, own0), wall0 = cpu_seconds(), time.perf_counter()
        for r in range(rounds):
            for i, row in enumerate(rows):
                log(
                    f"round {r + 1}/{rounds}, {i + 1}/{len(rows)}: {row.dtype} {row.system} {row.mode} "
                    f"{row.depth} batch {row.batch}"
                )
                row.run(timed=True)
        (everyone1, own1), wall1 = cpu_seconds(), time.perf_counter()

    results = [result_row(row, cfg, new, kv, kv_hf) for row in rows]
    for r in results:
        ref = next(
            (
                x
                for x in results
                if x["system"] == "HF Llama"
                and x["dtype"] == r["dtype"]
                and x["batch"] == r["batch"]
                and r["loops"] is not None
                and x["layers"] == match.get(r["loops"])
            ),
            None,
        )
        r["vs_hf"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        r["decode_vs_hf"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"] if ref else None
        r["flops_vs_hf"] = r["flops_per_token"] / ref["flops_per_token"] if ref else None
    background = max(0.0, ((everyone1 - everyone0) - (own1 - own0)) / (wall1 - wall0))
    return dict(
        new_tokens=new,
        rounds=rounds,
        dtypes=[dtype_name(d) for d in args.dtypes],
        auto_dtype=dtype_name(fastest_dtype("cpu")),
        cpu_flags=" ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()),
        llama_hidden=next(iter(hfs.values())).config.intermediate_size,
        match=match,
        flops_check=flops_check,
        kv_check={f"{d} {m} T={t}": v for (d, m, t), v in kv.items()}
        | {f"{d} llama {n}": v for (d, n), v in kv_hf.items()},
        background_cpus=background,
        rows=results,
        accuracy=accuracy(Path(args.accuracy), args.loops) if args.accuracy else None,
        matmul_bound={
            dtype_name(d): {t: matmul_bound(models[d], hfs_by[d][match[t]], t) for t in args.loops}
            for d in args.dtypes
        },
    )


def result_row(row: LoopedRow | LlamaRow, cfg: ModelConfig, new: int, kv: dict, kv_hf: dict) -> dict:
    looped_row = isinstance(row, LoopedRow)
    kv_bytes = kv[(row.dtype, row.mode, row.depth)] if looped_row else kv_hf[(row.dtype, row.depth)]
    layers = cfg.prelude_layers + cfg.core_layers * row.depth + cfg.coda_layers if looped_row else row.depth
    return dict(
        system=row.system,
        dtype=row.dtype,
        kv_cache=row.mode,
        loops=row.depth if looped_row else None,
        layers=layers,
        batch=row.batch,
        flops_per_token=row.flops,
        tokens_per_s=row.batch * new / statistics.median(row.times),
        decode_tokens_per_s=statistics.median(row.decode_rates),
        kv_bytes_per_token=kv_bytes["measured"],
        seconds=row.times,
    )


@torch.inference_mode()
def accuracy(path: Path, loops: list[int], new: int = 48) -> dict:
    """bf16 against float32 on a trained checkpoint: teacher-forced logits over the float32 model's greedy
    continuations of a few prompts (largest |Δ|, mean KL(fp32 ‖ bf16), argmax agreement), and how many
    greedy tokens the bf16 Engine produces before its first difference from the float32 one."""
    from looped.checkpoint import load

    fp32, bf16 = load(path, dtype=torch.float32).eval(), load(path, dtype=torch.bfloat16).eval()
    engines = {torch.float32: Engine(fp32), torch.bfloat16: Engine(bf16)}
    if (path / "tokenizer.json").is_file():
        from looped.data.tokenizer import Tokenizer

        prompts = [Tokenizer.load(path).encode(text) for text in ACCURACY_PROMPTS]
    else:
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, fp32.cfg.vocab_size, (len(ACCURACY_PROMPTS), 8), generator=gen).tolist()
    out = {}
    for t in loops:
        diff = kl = agree = 0.0
        same = total = 0
        for p in prompts:
            a, b = (
                engines[d].generate(p, loops=t, max_new_tokens=new, temperature=0).token_ids for d in engines
            )
            same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            total += len(a)
            ids = torch.tensor([p + a])
            hi, lo = fp32(ids, loops=t).logits[0], bf16(ids, loops=t).logits[0]
            diff = max(diff, float((hi - lo).abs().max()))
            lp_hi, lp_lo = hi.log_softmax(-1), lo.log_softmax(-1)
            kl += float((lp_hi.exp() * (lp_hi - lp_lo)).sum(-1).mean()) / len(prompts)
            agree += float((hi.argmax(-1) == lo.argmax(-1)).float().mean()) / len(prompts)
        out[t] = dict(
            max_abs_logit_diff=diff, mean_kl=kl, argmax_agreement=agree, greedy_same=same, greedy_total=total
        )
    return dict(checkpoint=str(path), new_tokens=new, by_loops=out)


# ---------------------------------------------------------------------------------------------- report
def find(r: dict, dtype: str, mode: str, loops: int, batch: int = 1) -> dict | None:
    return next(
        (
            x
            for x in r["rows"]
            if x["system"] == "looped"
            and x["dtype"] == dtype
            and x["kv_cache"] == mode
            and x["loops"] == loops
            and x["batch"] == batch
        ),
        None,
    )


def targets(r: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    for mode in MODES:  # issue 4's target, in float32 as it was set
        name = f"(a) float32 {mode}: ≥ 3× HF tokens/s at batch 1, equal FLOPs (T={MATCH_LOOPS})"
        row = find(r, "float32", mode, MATCH_LOOPS)
        if row is None or row["vs_hf"] is None:
            out.append((name, None, "not measured"))
        else:
            out.append((name, row["vs_hf"] >= 3, f"{row['vs_hf']:.2f}×"))
    for d in r["dtypes"]:
        lo, hi = r["kv_check"].get(f"{d} shared T=1"), r["kv_check"].get(f"{d} shared T=16")
        name = f"(b) {d}: shared KV bytes at 16 loops ≤ 1.1× those at 1 loop"
        if lo and hi:
            ratio = hi["measured"] / lo["measured"]
            out.append((name, ratio <= 1.1, f"{ratio:.2f}×"))
        else:
            out.append((name, None, "loops 1 and 16 not both run"))
    for d in r["dtypes"]:  # issue 17 §2b: the core stays in cache, each layer of Llama streams
        name = f"(c) {d} shared: ≥ 1.5× the FLOP-matched Llama in {d} at batch 1, T={RESIDENT_LOOPS}"
        row = find(r, d, "shared", RESIDENT_LOOPS)
        if row is None or row["vs_hf"] is None:
            out.append((name, None, "not measured"))
        else:
            out.append(
                (name, row["vs_hf"] >= 1.5, f"{row['vs_hf']:.2f}× (decode only {row['decode_vs_hf']:.2f}×)")
            )
    return out


def print_header(r: dict) -> None:
    print(
        f"{r['date']}  {r['machine']} ({r['cpu_flags']}), {r['cpus']} CPUs, {r['threads']} threads, "
        f"torch {r['torch']}, transformers {r['transformers']}; dtypes {', '.join(r['dtypes'])} "
        f"(auto picks {r['auto_dtype']} here)"
    )
    m = r["model"]
    print(
        f"looped: width {m['width']}, {m['n_heads']} heads, {m['prelude_layers']}/{m['core_layers']}/"
        f"{m['coda_layers']} layers, mlp {m['mlp']} (hidden {m['hidden']}), vocab {m['vocab_size']}; "
        f"Llama: same width and heads, SwiGLU hidden {r['llama_hidden']}, tied embeddings"
    )
    print(
        f"prompts {PROMPT} random tokens, {r['new_tokens']} new tokens, greedy; median of {r['rounds']} "
        f"round(s) after one warm-up; FLOPs/token averaged over contexts {PROMPT + 1}..{PROMPT + r['new_tokens']}"
    )
    fc = r["flops_check"]
    print(
        f"FLOPs formula ÷ FlopCounterMode (one forward, 96 tokens): looped {fc['looped']:.4f}, "
        f"Llama {fc['llama']:.4f}\n"
    )


def print_table(r: dict) -> None:
    print_header(r)
    head = (
        f"{'dtype':<8} {'system':<9} {'kv_cache':<8} {'loops':>5} {'layers':>6} {'batch':>5} {'FLOPs/token':>11} "
        f"{'tokens/s':>8} {'decode/s':>8} {'vs HF':>6} {'KV B/token':>10}"
    )
    print(head + "\n" + "-" * len(head))
    for x in r["rows"]:
        loops = "-" if x["loops"] is None else str(x["loops"])
        vs = "-" if x["vs_hf"] is None else f"{x['vs_hf']:.2f}×"
        print(
            f"{x['dtype']:<8} {x['system']:<9} {x['kv_cache']:<8} {loops:>5} {x['layers']:>6} {x['batch']:>5} "
            f"{x['flops_per_token'] / 1e6:10.1f}M {x['tokens_per_s']:8.1f} {x['decode_tokens_per_s']:8.1f} "
            f"{vs:>6} {x['kv_bytes_per_token']:10.0f}"
        )
    print(
        "\nvs HF: tokens/s over the FLOP-matched Llama's (2 + 2T + 2 layers) in the same dtype at the same batch; "
        "FLOPs ratio looped/Llama: "
        + ", ".join(
            f"T={x['loops']} {x['flops_vs_hf']:.3f}"
            for x in r["rows"]
            if x["system"] == "looped"
            and x["batch"] == 1
            and x["kv_cache"] == "shared"
            and x["flops_vs_hf"]
            and x["dtype"] == r["dtypes"][0]
        )
    )
    print(
        "cache-resident speed-up (batch 1, shared; tokens/s, and decode steps only, over the Llama of 2 + 2T + 2 layers):"
    )
    for d in r["dtypes"]:
        cells = [
            f"T={t} {x['vs_hf']:.2f}× ({x['decode_vs_hf']:.2f}×)"
            for t in sorted(r["match"])
            if (x := find(r, d, "shared", t)) is not None and x["vs_hf"] is not None
        ]
        print(f"  {d:<9} " + ", ".join(cells))
    print(
        "matmul-only bound (the same step's batch-1 products back to back, nothing else; Llama's time ÷ looped's):"
    )
    for d, by_loops in r["matmul_bound"].items():
        print(f"  {d:<9} " + ", ".join(f"T={t} {v:.2f}×" for t, v in by_loops.items()))
    bad = [k for k, v in r["kv_check"].items() if abs(v["measured"] - v["formula"]) > 0.5]
    print(
        "KV bytes/token: measured in filled caches; "
        + (
            "equal to the formulas everywhere"
            if not bad
            else f"DIFFERS from the formula for {', '.join(bad)}"
        )
    )
    if r["accuracy"]:
        acc = r["accuracy"]
        print(
            f"\nbf16 against float32 on {acc['checkpoint']} ({acc['new_tokens']} greedy tokens from {len(ACCURACY_PROMPTS)} prompts):"
        )
        for t, a in acc["by_loops"].items():
            print(
                f"  T={t}: max |Δlogit| {a['max_abs_logit_diff']:.3f}, mean KL {a['mean_kl']:.1e}, "
                f"argmax agreement {a['argmax_agreement']:.3f}, greedy tokens before the first difference "
                f"{a['greedy_same']}/{a['greedy_total']}"
            )
    print()
    for name, ok, value in targets(r):
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        print(f"[{verdict}] {name}: {value}")
    if r["background_cpus"] > 0.1:
        print(
            f"\nnote: other processes kept {r['background_cpus']:.1f} CPUs busy while this timed: rerun when quiet"
        )


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 new tokens and one round, for a smoke run")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (the table shows medians)")
    p.add_argument("--loops", type=_int_list, default=list(LOOPS))
    p.add_argument("--batches", type=_int_list, default=list(BATCHES), help="batch sizes (default 1,16)")
    p.add_argument(
        "--dtypes",
        type=parse_dtypes,
        default=[torch.float32, torch.bfloat16],
        help="weights and activations of both systems: float32, bfloat16 or auto, comma-separated "
        "(default float32,bfloat16)",
    )
    p.add_argument(
        "--accuracy", metavar="CHECKPOINT", help="also compare bf16 with float32 on this trained checkpoint"
    )
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig(**MODEL)
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=cpu_name(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        model=dict(MODEL, mlp=cfg.mlp, hidden=cfg.resolved_mlp_hidden),
        **measure(args),
    )
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
