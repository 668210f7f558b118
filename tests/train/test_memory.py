"""Memory held for backward: flat in forward-only loops, smaller still with per-loop activation checkpointing."""

from __future__ import annotations

import torch
from helpers import ids, tiny

from looped import LoopedLM


def saved_bytes(model: LoopedLM, loops: int, k: int) -> int:
    """Bytes autograd keeps for backward during one training forward (distinct storages, counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = ids(4, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x, loops=loops, backprop_loops=k).loss.backward()
    return sum(seen.values())


def test_forward_only_loops_do_not_grow_saved_activations():
    model = LoopedLM(tiny(state_init="like-init"))
    base = saved_bytes(model, loops=2, k=2)
    assert saved_bytes(model, loops=16, k=2) == base
    assert saved_bytes(model, loops=32, k=2) == base
    assert saved_bytes(model, loops=8, k=8) > 2 * base  # gradient loops do cost memory


def test_activation_checkpointing_keeps_less():
    model = LoopedLM(tiny())
    plain = saved_bytes(model, loops=6, k=6)
    model.activation_checkpointing = True
    checkpointed = saved_bytes(model, loops=6, k=6)
    assert checkpointed < 0.6 * plain


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LoopedLM(tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = ids(3, 12)
    grads = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad()
        model(x, labels=x, loops=torch.tensor([2, 5, 3]), backprop_loops=3).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
