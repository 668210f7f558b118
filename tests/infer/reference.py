"""An uncached, position-by-position reference for KV-cache rules: every key and value is recomputed from
stored layer inputs, and the rule that picks which loop's input an earlier position contributes is explicit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looped.model.layers import apply_rope
from looped.model.lm import LoopedLM


def _project(attn, xq, keys_in, tok_k, ve_emb):
    """Queries of xq (D,) and keys/values of keys_in (J, D), value embeddings of tokens tok_k mixed in."""
    H, KV, hd = attn.n_heads, attn.n_kv, attn.hd
    q = attn.wq(xq).view(1, 1, H, hd)
    k = attn.wk(keys_in).view(1, -1, KV, hd)
    v = attn.wv(keys_in).view(1, -1, KV, hd)
    if attn.qk_bias is not None:
        q, k = q + attn.qk_bias[0], k + attn.qk_bias[1]
    if attn.ve_gate is not None and ve_emb is not None:
        gate = 2 * torch.sigmoid(attn.ve_gate(keys_in[:, : attn.gate_channels]))  # (J, KV)
        v = v + gate[None, :, :, None] * ve_emb(tok_k).view(1, -1, KV, hd)
    return q, k, v, H, KV, hd


def _attention(model, attn, xq, keys_in, pos_q, pos_k, tok_k, ve_emb):
    """One query input xq (D,) at position pos_q over key inputs keys_in (J, D) at positions pos_k, by hand."""
    q, k, v, H, KV, hd = _project(attn, xq, keys_in, tok_k, ve_emb)
    q = apply_rope(q, model.rope[:, pos_q : pos_q + 1], attn.pairing)
    k = apply_rope(k, model.rope[:, pos_k], attn.pairing)  # (2, J, hd/2): one angle per key position
    if attn.qk_norm:
        q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    k = k.repeat_interleave(H // KV, dim=2)
    v = v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("qhd,khd->hqk", q[0], k[0]) / hd**0.5  # (H, 1, J)
    y = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[0])  # (1, H, hd)
    return attn.wo(y.reshape(1, H * hd))[0]


@torch.no_grad()
def reference_logits(
    model: LoopedLM, ids: list[int], prompt_len: int, loops: int | list[int], rule: str
) -> torch.Tensor:
    """Next-token logits at positions prompt_len-1 .. len(ids)-1 (one row each).

    `loops`: one count for every position, or T_j per position j.
    rule "per-loop": at loop t an earlier position j contributes its loop-min(t, T_j) input.
    rule "shared": prompt positions see each other at the current loop (a parallel prefill); a later position
    sees every earlier one at its last loop T_j.
    """
    counts = [loops] * len(ids) if isinstance(loops, int) else list(loops)
    cfg = model.cfg
    P, C = cfg.prelude_layers, cfg.core_layers
    tokens = torch.tensor(ids)
    ves = {int(i): emb for i, emb in model.value_embeds.items()}
    inputs: dict[tuple, list[torch.Tensor]] = {}  # (kind, layer, loop) → attention input per position
    out = []
    for s in range(len(ids)):

        def slot(key, s=s):
            lst = inputs.setdefault(key, [])
            while len(lst) <= s:
                lst.append(None)
            return key

        x = model.embed(tokens[s : s + 1])[0] * cfg.embed_scale
        for i, b in enumerate(model.prelude):
            k = slot(("prelude", i, 0))
            x = _block(model, b, x, inputs, k, lambda j, k=k: k, s, tokens, ves.get(i))
        e = model.prelude_norm(x) if model.prelude_norm is not None else x
        h = model.initial_state(e[None, None], torch.tensor([[s]]))[0, 0]  # e itself with injection none
        u = model.injection.prepare(e[None, None])
        for t in range(counts[s]):
            h = model.injection.step(h[None, None], u)[0, 0]
            for i, b in enumerate(model.core):
                k = slot(("core", i, t))

                def pick(j, k=k, i=i, t=t, s=s):
                    if j == s:
                        return k
                    if rule == "per-loop":
                        return ("core", i, min(t, counts[j] - 1))
                    if j < prompt_len and s < prompt_len:
                        return k
                    return ("core", i, counts[j] - 1)

                h = _block(model, b, h, inputs, k, pick, s, tokens, ves.get(P + i))
            if cfg.final_norm == "every-loop":
                h = model.final_norm(h)
        if cfg.final_norm == "state-and-head":
            h = model.final_norm(h)
        x = model.readout(h) if model.readout is not None else h
        for i, b in enumerate(model.coda):
            k = slot(("coda", i, 0))
            x = _block(model, b, x, inputs, k, lambda j, k=k: k, s, tokens, ves.get(P + C + i))
        if s >= prompt_len - 1:
            logits = model.head(x if cfg.final_norm == "every-loop" else model.final_norm(x)).float()
            if cfg.logit_softcap is not None:
                logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
            out.append(logits)
    return torch.stack(out)


def _block(model, b, x, inputs, key, pick, s, tokens, ve_emb):
    a_in = b.attn_norm(x)
    inputs[key][s] = a_in
    keys = torch.stack([inputs[pick(j)][j] for j in range(s + 1)])
    a = _attention(model, b.attn, a_in, keys, s, list(range(s + 1)), tokens[: s + 1], ve_emb)
    x = _add(b, x, a, b.attn_out_norm)
    return _add(b, x, b.mlp(b.mlp_norm(x)), b.mlp_out_norm)


def _add(b, x, out, norm):
    """The residual add of each block layout: pre-norm, sandwich (norm on the branch), sandwich-residual."""
    if norm is None:
        return x + out
    return norm(x + out) if b.residual_norm else x + norm(out)
