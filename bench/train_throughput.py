"""Training throughput: achieved FLOP/s of a full training step against this machine's fp32 matmul peak.

One run measures, on the same machine load:
- the reference, the fp32 matmul peak: the median GFLOP/s of large square matmuls, sampled before the
  first step and again after every round (these machines are shared and noisy);
- a full training step (forward with labels, backward, clip_grad_norm_, fused AdamW, zero_grad) of the
  looped model at backprop_loops 2 and 4 and of its FLOP-matched standard baseline, one step of each per
  round so that drift hits every row alike; medians over rounds. Achieved FLOP/s counts
  `model.flops_per_token(loops, seq_len, training=True, backprop_loops)` per token: forward-only loops
  are credited once, attention dense;
- the peak RSS of training steps at mean loops 4 and 32 (loops ~ Poisson(μ) per sequence, the same
  backprop_loops), each in a fresh process;
- with `--parcae-src DIR` (a checkout of github.com/sandyresearch/parcae; nothing of it ships here or is
  downloaded), Parcae's own model on the identical configuration as reference rows, timed in the same
  rounds: its `Parcae` class built from a `ParcaeConfig` with the same widths, layers, heads, vocabulary,
  QK-norm, ReLU², value embeddings, prelude norm and tied embeddings (the parameter counts are checked
  equal), forward with labels at per-batch depth (T − k forward-only loops, then k with gradients), and the
  same backward, clip, fused AdamW and zero_grad as the looped rows, so the rows differ in model code only.

    .venv/bin/python bench/train_throughput.py           # the issue's setting: ~4 minutes on 2 cores
    .venv/bin/python bench/train_throughput.py --quick   # a tiny model, for a smoke run: ~20 seconds
    .venv/bin/python bench/train_throughput.py --parcae-src ../parcae-src   # + Parcae rows: ~6 minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import cpu_name, cpu_seconds  # bench/common.py: bench/ is on sys.path when a script runs

import looped
from looped import LoopedLM, ModelConfig
from looped.train.step import keep_freed_memory

# Width 512, 2/2/2 layers, head_dim 128, ReLU² at 4×, QK-norm and value embeddings as in the Parcae presets.
FULL = dict(
    model=dict(vocab_size=4096, width=512, n_heads=4, prelude_layers=2, core_layers=2, coda_layers=2),
    batch=8,
    seq=256,
    loops=4,
    peak_sizes=(2048, 3072, 4096),
    mean_loops=(4, 32),
)
QUICK = dict(
    model=dict(vocab_size=256, width=64, n_heads=2, prelude_layers=2, core_layers=2, coda_layers=2),
    batch=2,
    seq=32,
    loops=4,
    peak_sizes=(256, 512),
    mean_loops=(4, 8),
)
COMMON = dict(mlp="relu2", value_embeds=True, qk_norm=True, state_init="like-init")
BACKPROP_LOOPS = 2  # k of the training setting (Parcae: ⌈μ/2⌉); the table adds k = loops


def model_config(setting: dict) -> ModelConfig:
    return ModelConfig(**setting["model"], **COMMON, loops=setting["loops"], max_seq_len=setting["seq"])


def matmul_gflops(n: int, reps: int = 3) -> list[float]:
    """GFLOP/s of `reps` fp32 (n×n)·(n×n) matmuls, after one untimed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.mm(a, b)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return rates


class Trainer:
    """A model, its optimizer and one fixed batch; `step` runs a full training step and returns its seconds."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, model: torch.nn.Module | None = None) -> None:
        keep_freed_memory()  # as looped's training loop does (train/step.py): every row of this process
        torch.manual_seed(0)
        self.model = (LoopedLM(cfg) if model is None else model).train()
        # Fused AdamW: one kernel over all parameters, about 5× faster than foreach on this CPU.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:].contiguous()

    def loss(self, loops: int | torch.Tensor, backprop_loops: int | None) -> torch.Tensor:
        return self.model(self.inputs, labels=self.labels, loops=loops, backprop_loops=backprop_loops).loss

    def params(self) -> int:
        return self.model.num_params()["total"]

    def flops_per_token(self, loops: int, seq: int, backprop_loops: int | None) -> float:
        return self.model.flops_per_token(loops, seq, training=True, backprop_loops=backprop_loops)

    def step(self, loops: int | torch.Tensor, backprop_loops: int | None) -> float:
        t = time.perf_counter()
        self.loss(loops, backprop_loops).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


class ParcaeTrainer(Trainer):
    """Parcae's own model (its `Parcae` class, from a source tree given on the command line) on the
    configuration of `cfg`, stepped like `Trainer`; `flops_per_token` is the looped model's, whose
    architecture it is (the constructor checks the parameter counts agree)."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, src: str) -> None:
        sys.path.insert(0, os.path.abspath(src))
        from parcae_lm.models.parcae.config import ParcaeConfig  # the Parcae tree named by --parcae-src

        pcfg = ParcaeConfig(
            name="looped-bench",
            block_size=seq,
            vocab_size=cfg.vocab_size,
            padding_multiple=64,
            n_embd=cfg.width,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.resolved_n_kv_heads,
            intermediate_size=cfg.resolved_mlp_hidden,
            bias=False,
            tie_embeddings=cfg.tie_embeddings,
            block_class_name="TransformerPreNormBlock",
            norm_class_name="RMSNorm",
            norm_eps=cfg.norm_eps,
            mlp_class_name="BaseMLP",
            nonlin_name="ReLU2",
            qk_norm=cfg.qk_norm,
            prelude_norm=cfg.prelude_norm,
            init_strategy="scaled-zero",
            init_orthogonal=True,
            injection_type="diagonal",
            state_init=cfg.state_init,
            recurrent_embedding_dimension=cfg.width,
            recurrent_intermediation_embedding_dimension=cfg.resolved_mlp_hidden,
            n_layers_in_prelude=cfg.prelude_layers,
            n_layers_in_recurrent_block=cfg.core_layers,
            n_layers_in_coda=cfg.coda_layers,
            mean_recurrence=cfg.loops,
            mean_backprop_depth=BACKPROP_LOOPS,
            recurrent_iteration_method="per-batch",  # (T − k, k) given per call, as the looped rows
            attn_impl="sdpa",
            rope_settings=dict(rope_base=int(cfg.rope_base)),
        )
        torch.manual_seed(0)
        super().__init__(cfg, batch, seq, model=pcfg.construct_model())
        self.reference = LoopedLM(cfg)
        ours, theirs = self.reference.num_params()["total"], self.params()
        if ours != theirs:
            raise SystemExit(
                f"Parcae's model has {theirs:,} parameters, the looped one {ours:,}: not the same"
            )

    def loss(self, loops: int | torch.Tensor, backprop_loops: int | None) -> torch.Tensor:
        k = loops if backprop_loops is None else min(int(backprop_loops), int(loops))
        pair = torch.tensor([int(loops) - k, k])  # forward-only loops, then loops with gradients
        return self.model(self.inputs, labels=self.labels, num_steps_pair=pair)["loss"]

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def flops_per_token(self, loops: int, seq: int, backprop_loops: int | None) -> float:
        return self.reference.flops_per_token(loops, seq, training=True, backprop_loops=backprop_loops)


def throughput(setting: dict, steps: int, warmup: int, parcae_src: str | None = None) -> dict:
    cfg = model_config(setting)
    base_cfg = looped.baseline(cfg, match="flops", loops=setting["loops"])
    B, S, T = setting["batch"], setting["seq"], setting["loops"]
    peaks = [rate for n in setting["peak_sizes"] for rate in matmul_gflops(n)]
    net, base = Trainer(cfg, B, S), Trainer(base_cfg, B, S)
    layers = f"{cfg.prelude_layers}/{cfg.core_layers}/{cfg.coda_layers}"
    rows = [(f"looped {layers} ×{T}, k={k}", net, T, k) for k in (BACKPROP_LOOPS, T)]
    if parcae_src is not None:
        parcae = ParcaeTrainer(cfg, B, S, parcae_src)
        rows += [(f"Parcae's code {layers} ×{T}, k={k}", parcae, T, k) for k in (BACKPROP_LOOPS, T)]
    rows.append((f"standard {base_cfg.n_layers} layers, FLOP-matched", base, 1, None))
    times: dict[str, list[float]] = {row[0]: [] for row in rows}
    for _ in range(warmup):
        for _, trainer, loops, k in rows:
            trainer.step(loops, k)
    (everyone0, own0), wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        for name, trainer, loops, k in rows:
            times[name].append(trainer.step(loops, k))
        peaks += matmul_gflops(setting["peak_sizes"][-1], reps=1)
    (everyone1, own1), wall1 = cpu_seconds(), time.perf_counter()
    peak = statistics.median(peaks)
    results = []
    for name, trainer, loops, k in rows:
        flops = trainer.flops_per_token(loops, S, k)
        tokens_per_s = B * S / statistics.median(times[name])
        gflops = flops * tokens_per_s / 1e9
        results.append(
            dict(
                model=name,
                params=trainer.params(),
                backprop_loops=k,
                flops_per_token=flops,
                tokens_per_s=tokens_per_s,
                gflops=gflops,
                pct_peak=100 * gflops / peak,
                step_s=times[name],
            )
        )
    for r in results:
        r["vs_baseline"] = r["gflops"] / results[-1]["gflops"]
        # Looped against Parcae's code at the same k: the ratio of tokens/s on the same configuration.
        theirs = [
            p
            for p in results
            if p["model"].startswith("Parcae") and p["backprop_loops"] == r["backprop_loops"]
        ]
        if theirs and r["model"].startswith("looped"):
            r["vs_parcae"] = r["tokens_per_s"] / theirs[0]["tokens_per_s"]
    # CPUs that other processes kept busy while we timed: a shared machine makes every number pessimistic.
    background = max(0.0, ((everyone1 - everyone0) - (own1 - own0)) / (wall1 - wall0))
    return dict(peak_gflops=peak, peak_samples=len(peaks), background_cpus=background, rows=results)


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB, from /proc/self/status (Linux).

    VmHWM belongs to this process's own address space; ru_maxrss would not do, because Linux carries it
    across exec: a child of a large parent reports at least the parent's size.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def memory_child(setting: dict, mean_loops: int, steps: int = 2) -> dict:
    """In a fresh process: peak RSS over training steps with loops ~ Poisson(mean_loops) per sequence."""
    trainer = Trainer(model_config(setting), setting["batch"], setting["seq"])
    built = memory_mib("VmRSS")
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loops = torch.poisson(torch.full((setting["batch"],), float(mean_loops)), gen).clamp(min=1).long()
        trainer.step(loops, BACKPROP_LOOPS)
    return dict(
        mean_loops=mean_loops, backprop_loops=BACKPROP_LOOPS, peak_mib=memory_mib("VmHWM"), built_mib=built
    )


def memory(args: argparse.Namespace, mean_loops: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(mean_loops), "--threads", str(args.threads)]
    out = subprocess.run(cmd + ["--quick"] * args.quick, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def print_table(r: dict) -> None:
    s = r["setting"]
    print(
        f"{r['date']}  {r['machine']}, {r['cpus']} CPUs, {r['threads']} threads, torch {r['torch']}, float32"
    )
    print(
        f"width {s['width']}, {s['prelude_layers']}/{s['core_layers']}/{s['coda_layers']} layers, "
        f"batch {s['batch']} × seq {s['seq_len']}, loops {s['loops']}, vocab {s['vocab_size']}"
    )
    print(f"fp32 matmul peak {r['peak_gflops']:.1f} GFLOP/s (median of {r['peak_samples']} square matmuls)\n")
    head = f"{'model':<34} {'params':>7} {'FLOPs/token':>11} {'tokens/s':>8} {'GFLOP/s':>7} {'% peak':>6} {'vs base':>7}"
    print(head + "\n" + "-" * len(head))
    for row in r["rows"]:
        print(
            f"{row['model']:<34} {row['params'] / 1e6:6.1f}M {row['flops_per_token'] / 1e6:10.1f}M "
            f"{row['tokens_per_s']:8.0f} {row['gflops']:7.1f} {row['pct_peak']:5.1f}% {row['vs_baseline']:6.2f}×"
            + (f"   {row['vs_parcae']:.2f}× Parcae's tokens/s" if "vs_parcae" in row else "")
        )
    if r["memory"]:
        ref = r["memory"][0]
        print(
            f"\n{'peak RSS, fresh process per row':<34} {'peak':>9} {'over built':>11} {'× μ=' + str(ref['mean_loops']):>7}"
        )
        for m in r["memory"]:
            name = f"mean loops {m['mean_loops']} (Poisson), k={m['backprop_loops']}"
            print(
                f"{name:<34} {m['peak_mib']:5.0f} MiB {m['peak_mib'] - m['built_mib']:+7.0f} MiB "
                f"{m['peak_mib'] / ref['peak_mib']:6.2f}×"
            )
    if r["background_cpus"] > 0.1:
        print(
            f"\nnote: other processes kept {r['background_cpus']:.1f} CPUs busy while this timed: rerun when quiet"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed rounds, one step of each model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    p.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    p.add_argument(
        "--parcae-src",
        metavar="DIR",
        help="a Parcae source tree (github.com/sandyresearch/parcae): add its training step as reference rows",
    )
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setting = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(setting, args.memory_child)))
        return
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=cpu_name(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        setting=dict(
            batch=setting["batch"], seq_len=setting["seq"], loops=setting["loops"], **setting["model"]
        ),
        **throughput(setting, args.steps, args.warmup, args.parcae_src),
        memory=[] if args.no_memory else [memory(args, mu) for mu in setting["mean_loops"]],
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
