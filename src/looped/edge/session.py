"""What `looped generate --backend onnx` does with an exported folder: one JSON-ready record per loop count,
in the shape `looped.infer.records.format_record` prints."""

from __future__ import annotations

import time
from pathlib import Path

from looped.edge.runtime import EdgeModel
from looped.errors import EdgeError


def flops_per_token(manifest: dict, loops: float, seq_len: int) -> float:
    """Forward matmul FLOPs of one token at `loops` loops in a context of `seq_len` tokens, from the linear
    coefficients the export records (`looped.model.accounting.flops_per_token`)."""
    f = manifest.get("flops")
    if not f:
        return 0.0
    once = f["once"][0] + f["once"][1] * seq_len
    per_loop = f["per_loop"][0] + f["per_loop"][1] * seq_len
    return once + loops * per_loop


def generate_records(
    path: str | Path,
    prompt: str,
    loops: list[int | None],
    *,
    variant: str = "float32",
    threads: int | None = None,
    exit: str | None = None,
    **options,
) -> list[dict]:
    """Continue `prompt` once per entry of `loops` (None: the export's default, or the latency budget's
    choice with `budget_ms`); `options` go to `EdgeModel.generate`."""
    model = EdgeModel(path, variant=variant, threads=threads)
    if model.tokenizer is None:
        raise EdgeError(
            f"{path}: the export has no tokenizer, so it takes no text prompt (EdgeModel takes ids)"
        )
    prompt_tokens = len(model.tokenizer.encode(prompt))
    records = []
    for t in loops:
        t0 = time.perf_counter()
        pieces = list(model.generate(prompt, loops=t, exit=exit, **options))
        seconds = time.perf_counter() - t0
        used = [p.loops for p in pieces]
        mean = sum(used) / len(used) if used else 0.0
        records.append(
            {
                "backend": "onnx",
                "variant": variant,
                "loops": t if t is not None else (max(used) if used else None),
                "exit": exit,
                "kv_cache": options.get("kv_cache") or model.manifest["kv_cache"],
                "tokens": len(pieces),
                "text": "".join(p.text for p in pieces),
                "token_ids": [p.token for p in pieces],
                "loops_per_token": used,
                "ms_per_token": [round(p.ms, 3) for p in pieces],
                "mean_loops": mean,
                "tokens_per_s": len(pieces) / seconds if seconds > 0 else 0.0,
                "flops_per_token": flops_per_token(model.manifest, mean, prompt_tokens + len(pieces)),
                "prompt_tokens": prompt_tokens,
            }
        )
    return records
