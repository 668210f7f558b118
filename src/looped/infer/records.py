"""How `looped generate` prints a run: one function on plain records, importing nothing (no torch), so that the
ONNX path (`--backend onnx`, looped.edge) prints the same way without loading torch."""

from __future__ import annotations


def format_record(prompt: str, r: dict, show_loops: bool) -> str:
    """A header line, the prompt and its continuation, and optionally the loops each token ran."""
    head = f"--- {r['loops']} loops" + (f", exit {r['exit']}" if r["exit"] else "")
    head += (
        f" · {r['tokens']} tokens · {r['tokens_per_s']:.0f} tokens/s · mean loops {r['mean_loops']:.2f}"
        f" · {r['flops_per_token'] / 1e6:.1f} MFLOPs/token"
    )
    if r.get("speculative"):
        draft, ahead = r["speculative"]
        head += f" · drafts at {draft} loops, {ahead} ahead, {r['acceptance']:.0%} accepted"
    lines = [head, prompt + (r["text"] or "")]
    if show_loops:
        lines.append("loops per token: " + " ".join(str(t) for t in r["loops_per_token"]))
    return "\n".join(lines)
