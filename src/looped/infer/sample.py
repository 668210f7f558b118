"""Plain autoregressive sampling at a fixed loop count, recomputing the whole prefix for every token.

Simple and exact, for demos and tests; its cost grows with the square of the output length.
"""

from __future__ import annotations

import torch

from looped.model.looped import LoopedLM


@torch.no_grad()
def sample(
    model: LoopedLM,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    loops: int | None = None,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Continue `prompt_ids` with up to `max_new_tokens` tokens run at `loops` loops (None: model default).

    temperature 0 is greedy; the context is cut to the model's max_seq_len from the left.
    """
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.cfg.max_seq_len :]], device=device)
        logits = model(context, loops=loops).logits[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if stop_id is not None and token == stop_id:
            break
        ids.append(token)
        out.append(token)
    return out


def generate_text(
    checkpoint: str,
    prompt: str,
    loops: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> list[dict]:
    """Continue `prompt` once per loop count with the checkpoint's own tokenizer; one record per loop count."""
    import time
    from pathlib import Path

    from looped.checkpoint import CheckpointError, load
    from looped.data.tokenizer import Tokenizer

    if not (Path(checkpoint) / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{checkpoint}: no tokenizer.json (checkpoints written by `looped train` carry one)"
        )
    tok = Tokenizer.load(checkpoint)
    model = load(checkpoint)
    ids = tok.encode(prompt)
    records = []
    for t in loops:
        start = time.perf_counter()
        new = sample(model, ids, max_new_tokens, t, temperature, top_k, seed, stop_id=tok.eot_id)
        seconds = time.perf_counter() - start
        records.append({"loops": t, "text": tok.decode(new), "tokens": len(new), "seconds": seconds})
    return records
