"""Text summaries of a model for the CLI: the `info` accounting table and the `probe` run across loop counts."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence

import torch

from looped.checkpoint import load, load_config_dir
from looped.config import ModelConfig, load_config
from looped.model import accounting
from looped.model.lm import LoopedLM


def resolve_model_config(
    checkpoint: str | None, files: Sequence[str], overrides: Sequence[str]
) -> ModelConfig:
    """The model config from a checkpoint directory, or from presets/files and overrides."""
    if checkpoint is not None:
        if files or overrides:
            raise ValueError("give either a checkpoint directory or --preset/--config/--set, not both")
        return load_config_dir(checkpoint).model
    return load_config(files, overrides).model


def describe(cfg: ModelConfig) -> str:
    kind = (
        f"{cfg.prelude_layers}/{cfg.core_layers}/{cfg.coda_layers} prelude/core/coda layers, {cfg.injection} injection, default loops {cfg.loops}"
        if cfg.looped
        else f"standard transformer, {cfg.n_layers} layers"
    )
    return (
        f"{kind}; width {cfg.width}, {cfg.n_heads} heads (kv {cfg.resolved_n_kv_heads}, dim {cfg.resolved_head_dim}), "
        f"{cfg.mlp} MLP {cfg.resolved_mlp_hidden}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}"
    )


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def info_data(cfg: ModelConfig, loops: Sequence[int], seq_len: int | None = None) -> dict:
    seq_len = seq_len or cfg.max_seq_len
    rows = []
    for t in loops if cfg.looped else [1]:
        k = min(t, max(1, (cfg.loops + 1) // 2))
        rows.append(
            {
                "loops": t,
                "flops_forward": accounting.flops_per_token(cfg, t, seq_len),
                "flops_train": accounting.flops_per_token(cfg, t, seq_len, training=True, backprop_loops=k),
                "backprop_loops": k,
                "unrolled_params": accounting.unrolled_params(cfg, t),
                "kv_bytes_per_loop": accounting.kv_cache_bytes_per_token(
                    cfg, t, torch.bfloat16, shared=False
                ),
                "kv_bytes_shared": accounting.kv_cache_bytes_per_token(cfg, t, torch.bfloat16, shared=True),
            }
        )
    data = {
        "config": cfg.to_dict(),
        "params": accounting.param_counts(cfg),
        "seq_len": seq_len,
        "loops": rows,
    }
    if cfg.looped:
        by_params = accounting.baseline(cfg, "params")
        by_flops = accounting.baseline(cfg, "flops", cfg.loops, seq_len)
        data["baselines"] = {
            "params": {"layers": by_params.n_layers, "params": accounting.param_counts(by_params)["total"]},
            "flops": {
                "loops": cfg.loops,
                "layers": by_flops.n_layers,
                "params": accounting.param_counts(by_flops)["total"],
                "flops_forward": accounting.flops_per_token(by_flops, 1, seq_len),
            },
        }
    return data


def info(
    checkpoint: str | None,
    files: Sequence[str],
    overrides: Sequence[str],
    loops: Sequence[int],
    seq_len: int | None = None,
    as_json: bool = False,
) -> str:
    """The `looped info` report: parameter breakdown, FLOPs per token and KV-cache bytes per token against loops."""
    cfg = resolve_model_config(checkpoint, files, overrides)
    data = info_data(cfg, loops, seq_len)
    if as_json:
        return json.dumps(data, indent=2)
    params = data["params"]
    lines = [describe(cfg), "", "parameters (unique)"]
    total = params["total"]
    for part, n in params.items():
        if part != "total" and n:
            lines.append(f"  {part:<13}{n:>15,}  {100 * n / total:5.1f} %")
    lines += [f"  {'total':<13}{total:>15,}", ""]
    lines.append(
        f"per token at sequence length {data['seq_len']} (train: backprop through the last k loops; KV in bf16)"
    )
    lines.append(
        f"  {'loops':>5} {'fwd FLOPs':>10} {'train FLOPs':>12} {'k':>3} {'unrolled params':>16} {'KV per-loop':>12} {'KV shared':>10}"
    )
    for r in data["loops"]:
        lines.append(
            f"  {r['loops']:>5} {_human(r['flops_forward']):>10} {_human(r['flops_train']):>12} {r['backprop_loops']:>3} "
            f"{r['unrolled_params']:>16,} {r['kv_bytes_per_loop']:>11,}B {r['kv_bytes_shared']:>9,}B"
        )
    if "baselines" in data:
        bp, bf = data["baselines"]["params"], data["baselines"]["flops"]
        lines += [
            "",
            "standard baselines (looped.baseline, same width and blocks)",
            f"  parameter-matched: {bp['layers']} layers, {bp['params']:,} parameters",
            f"  FLOP-matched at {bf['loops']} loops: {bf['layers']} layers, {bf['params']:,} parameters, "
            f"{_human(bf['flops_forward'])} FLOPs/token",
        ]
    return "\n".join(lines)


def probe(
    checkpoint: str | None,
    files: Sequence[str],
    overrides: Sequence[str],
    loops: Sequence[int],
    batch: int = 4,
    seq_len: int = 64,
    seed: int = 0,
) -> str:
    """Run a model in eval mode on random tokens at each loop count: speed, state norm, ρ(Ā) and contraction."""
    cfg = resolve_model_config(checkpoint, files, overrides)
    if checkpoint is not None:
        model = load(checkpoint)
    else:
        torch.manual_seed(seed)
        model = LoopedLM(cfg).eval()
    seq_len = min(seq_len, cfg.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    lines = [
        describe(cfg),
        f"random tokens, batch {batch} × {seq_len}, eval mode, {torch.get_num_threads()} threads",
        "",
    ]
    report = model.stability_report(ids, loops=max(loops)) if cfg.looped else None
    if report is not None:
        lines.append(
            f"ρ(Ā) = {report.rho:.4f}   σ_max(B̄) = {report.sigma['injection.input']:.3f}"
            + (f"   σ_max(C) = {report.sigma['readout.C']:.3f}" if "readout.C" in report.sigma else "")
        )
        lines.append("")
    lines.append(
        f"  {'loops':>5} {'ms/forward':>11} {'tokens/s':>10} {'GFLOP/s':>8} {'‖h_T‖':>9} {'contraction':>12} {'entropy':>8}"
    )
    for t in loops if cfg.looped else [1]:
        times = []
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                out = model(ids, loops=t)
                times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        tokens = batch * seq_len
        flops = accounting.flops_per_token(cfg, t, seq_len) * tokens
        probs = out.logits.float().softmax(-1)
        entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
        norm = f"{report.state_norms[t - 1]:.3f}" if report else "-"
        ratio = f"{report.contraction[t - 2]:.3f}" if report and t >= 2 else "-"
        lines.append(
            f"  {t:>5} {ms:>11.2f} {tokens / ms * 1000:>10,.0f} {flops / ms / 1e6:>8.1f} {norm:>9} {ratio:>12} {entropy:>8.3f}"
        )
    lines.append("")
    lines.append(
        "contraction = ‖h_t − h_(t−1)‖ / ‖h_(t−1) − h_(t−2)‖ at the last loop; below 1 the loop settles."
    )
    return "\n".join(lines)
