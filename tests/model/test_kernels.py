"""The CPU kernels (model/kernels.py) against plain PyTorch: forward bit for bit, gradients against autograd
(and float64 gradcheck), the no-grad forms within rounding, and a model trained through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ids, randomize_, tiny

from looped import LoopedLM
from looped.model import kernels, layers
from looped.model.layers import apply_rope, rope_table

DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.requires_grad_(grad)


def _plain_rms_norm(x, weight=None, eps=None):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _plain_relu2(h, inplace=False):
    return F.relu(h).square()


def _plain_rotate(x, rotation, pairing):
    """apply_rope's complex product as it was written before the kernels (autograd differentiates it)."""
    rotation = torch.complex(rotation[0], rotation[1])
    if pairing == "half":
        xf, h = x.float(), x.shape[-1] // 2
        turned = torch.complex(xf[..., :h], xf[..., h:]) * rotation
        return torch.cat([turned.real, turned.imag], dim=-1).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def _rotation(seq: int, hd: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    table = rope_table(hd, seq, 10_000.0).to(torch.promote_types(dtype, torch.float32))
    return table[:, None, :, None, :]  # (2, 1, S, 1, hd/2): cosines and sines


# ---------------------------------------------------------------- forward: bit for bit
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape,weighted", [((3, 7, 48), True), ((2, 5, 4, 32), False), ((1, 1, 64), True)])
def test_rms_norm_forward_with_autograd_is_f_rms_norm_bit_for_bit(dtype, shape, weighted):
    x = _rand(*shape, dtype=dtype, grad=True)
    w = (1 + 0.1 * _rand(shape[-1], seed=1)).to(dtype).requires_grad_() if weighted else None
    for eps in (None, 1e-5):
        with torch.no_grad():
            want = F.rms_norm(x, (shape[-1],), w, eps)
        got = kernels.rms_norm(x, w, eps)
        assert got.grad_fn is not None and got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_forward_is_bit_for_bit(dtype):
    h = _rand(4, 9, 40, dtype=dtype, grad=True)
    want = F.relu(h.detach()).square()
    assert torch.equal(kernels.relu2(h), want)
    with torch.no_grad():
        fresh = h.detach().clone()
        assert torch.equal(kernels.relu2(fresh, inplace=True), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("hd", [16, 12])  # 16: the complex product vectorises; 12: it does not
def test_rope_forward_is_the_complex_product_to_the_last_bit(dtype, pairing, hd):
    x = _rand(2, 6, 3, hd, dtype=dtype, grad=True)
    rotation = _rotation(6, hd)
    got = kernels.rotate_pairs(x, rotation, pairing)
    assert got.grad_fn is not None and got.dtype == dtype
    want = _plain_rotate(x.detach(), rotation, pairing)
    # float32: within an ulp or two of |x| ≈ 3; bfloat16: the float32 results round to neighbours at most
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not got.is_complex() and not any(t.is_complex() for t in (rotation, x))


# ---------------------------------------------------------------- gradients: against autograd
def _grads(fn, *inputs: torch.Tensor, seed: int = 3) -> list[torch.Tensor]:
    out = fn(*inputs)
    g = _rand(*out.shape, dtype=out.dtype, seed=seed)
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 5, 4, 32)])
def test_rms_norm_gradients_equal_autograd(weighted, shape):
    x = _rand(*shape, grad=True)
    w = (1 + 0.1 * _rand(shape[-1], seed=1)).requires_grad_() if weighted else None
    ours = _grads(lambda a, b: kernels.rms_norm(a, b, 1e-5), x, w)
    theirs = _grads(lambda a, b: _plain_rms_norm(a, b, 1e-5), x, w)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rms_norm_bf16_gradients_follow_the_float32_formula():
    x = _rand(3, 5, 32, dtype=torch.bfloat16, grad=True)
    w = (1 + 0.1 * _rand(32, seed=1)).to(torch.bfloat16).requires_grad_()
    ours = _grads(lambda a, b: kernels.rms_norm(a, b, 1e-5), x, w)
    theirs = _grads(lambda a, b: _plain_rms_norm(a, b, 1e-5), x, w)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_relu2_gradient_equals_autograd_exactly():
    h = _rand(4, 9, 40, grad=True)
    (ours,) = _grads(kernels.relu2, h)
    (theirs,) = _grads(_plain_relu2, h)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rope_gradient_equals_autograd(pairing):
    x = _rand(2, 6, 3, 16, grad=True)
    rotation = _rotation(6, 16)
    (ours,) = _grads(lambda a: kernels.rotate_pairs(a, rotation, pairing), x)
    (theirs,) = _grads(lambda a: _plain_rotate(a, rotation, pairing), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_rope_gradient_of_a_strided_incoming_gradient():
    """Attention's backward hands the rotation a transposed gradient; pairs must still be read right."""
    x = _rand(2, 6, 3, 16, grad=True)
    rotation = _rotation(6, 16)
    g = _rand(2, 3, 6, 16, seed=5).transpose(1, 2)  # (B, S, H, hd) with strides of (B, H, S, hd)
    (ours,) = torch.autograd.grad(kernels.rotate_pairs(x, rotation, "interleaved"), x, g)
    (theirs,) = torch.autograd.grad(_plain_rotate(x, rotation, "interleaved"), x, g)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_float64_gradcheck():
    x = _rand(2, 3, 8, dtype=torch.float64, grad=True)
    w = (1 + 0.1 * _rand(8, seed=1)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: kernels.rms_norm(a), (x,))
    h = _rand(3, 10, dtype=torch.float64, grad=True)
    h.data[h.data.abs() < 1e-3] = 0.5  # away from relu's kink, where finite differences are meaningless
    assert torch.autograd.gradcheck(kernels.relu2, (h,))
    rotation = _rotation(3, 8, torch.float64)
    for pairing in ("interleaved", "half"):
        q = _rand(2, 3, 2, 8, dtype=torch.float64, grad=True)
        assert torch.autograd.gradcheck(lambda a, p=pairing: kernels.rotate_pairs(a, rotation, p), (q,))


# ---------------------------------------------------------------- inference forms
@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 rows of 512 take the one-output form
@pytest.mark.parametrize("weighted", [True, False])
def test_no_grad_rms_norm_within_rounding_of_f_rms_norm(rows, weighted):
    x = 3 * _rand(rows, 512)
    w = (1 + 0.1 * _rand(512, seed=1)) if weighted else None
    want = F.rms_norm(x, (512,), w, 1e-5)
    with torch.no_grad():
        got = kernels.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 8, 300])  # 1 and 8 rows of 256: layer_norm of [x, −x]; 300: one output
@pytest.mark.parametrize("weighted", [True, False])
def test_no_grad_rms_norm_in_bfloat16(rows, weighted):
    x = 3 * _rand(rows, 256, dtype=torch.bfloat16)
    w = (1 + 0.1 * _rand(256, seed=1)).to(torch.bfloat16) if weighted else None
    with torch.no_grad():
        got = kernels.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # One bfloat16 step at most: the only difference is the order of float32 sums inside 1/rms.
    torch.testing.assert_close(got, F.rms_norm(x, (256,), w, 1e-5), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 100.0])  # a common offset: the pair [x, −x] still has mean zero
def test_symmetric_layer_norm_form_within_rounding(dtype, offset):
    """RMSNorm as layer_norm of [x, −x], checked directly in float32/float64 (the no-grad path takes it
    for small unweighted float32 and small bfloat16 inputs)."""
    x = (_rand(2, 3, 4, 32) + offset).to(dtype)
    w = (1 + 0.1 * _rand(32, seed=1)).to(dtype)
    for weight in (None, w):
        got = kernels._rms_norm_symmetric(x, weight, 1e-5)
        torch.testing.assert_close(got, F.rms_norm(x, (32,), weight, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"block_norm": "sandwich"}, {"block_norm": "sandwich-residual"}])
def test_no_grad_model_forward_within_rounding_of_the_training_forward(overrides):
    """The inference forms (one-pass norms, in-place residuals and ReLU²) against the autograd forward,
    whose numbers are the plain ops' (checked above); the inputs are left as they were."""
    model = randomize_(LoopedLM(tiny(mlp="relu2", qk_norm=True, **overrides))).eval()
    x = ids()
    want = model(x, loops=3).logits
    assert want.requires_grad
    with torch.no_grad():
        got = model(x, loops=3).logits
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        emb, ves = model.embed_inputs(x)
        rope = model.rotary(x.shape[1])
        inputs = model.loop_inputs(model.run_prelude(emb, rope, ves), rope, ves)
        kept = [inputs.e.clone(), inputs.u[1].clone()]  # e and the diagonal injection's drive B̄e
        model.iterate(inputs, model.loop_counts(3, 2, x.device))
    assert torch.equal(inputs.e, kept[0]) and torch.equal(inputs.u[1], kept[1])


def test_bfloat16_model_forward_runs_through_the_kernels():
    model = randomize_(LoopedLM(tiny(mlp="relu2", qk_norm=True))).eval()
    x = ids()
    ref = model(x, loops=2).logits.detach()
    model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(x, loops=2).logits
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------- whole model
def test_model_gradients_equal_plain_autograd(monkeypatch):
    """Every parameter's gradient with the kernels equals the one autograd gives through plain ops."""
    model = randomize_(LoopedLM(tiny(mlp="relu2", qk_norm=True)))
    x = ids()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, labels=x, loops=3, backprop_loops=2).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    ours = grads()
    monkeypatch.setattr(layers, "rms_norm", _plain_rms_norm)
    monkeypatch.setattr(layers, "relu2", _plain_relu2)
    monkeypatch.setattr(layers, "rotate_pairs", _plain_rotate)
    torch.manual_seed(0)
    theirs = grads()
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_through_the_kernels_decreases_the_loss():
    torch.manual_seed(0)
    model = LoopedLM(tiny(mlp="relu2", qk_norm=True, state_init="zero"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = ids(batch=4, seq=16)
    losses = []
    for _ in range(30):
        loss = model(x[:, :-1], labels=x[:, 1:], loops=3, backprop_loops=2).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_apply_rope_uses_the_kernel_under_autograd():
    q = _rand(1, 4, 2, 8, grad=True)
    out = apply_rope(q, rope_table(8, 4, 10_000.0))
    assert type(out.grad_fn).__name__ == "_RotateBackward"
