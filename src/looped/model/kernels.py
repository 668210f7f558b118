"""CPU kernels of the blocks: RMSNorm, ReLU² and rotary embedding as autograd functions, and their no-grad forms.

PyTorch's CPU RMSNorm is a composite of five elementwise passes, and autograd differentiates that
composite: about ten more passes in backward. The functions here keep each forward bit for bit what the
plain ops compute (tests/model/test_kernels.py checks it) and write backward by hand, saving what the
forward computed anyway (the per-row 1/rms, the rotation) instead of recomputing it.

Without autograd (inference), `rms_norm` on prefill-sized inputs allocates one output where the composite
allocates three (x², x·r, ·w), the scale applied in place: 1.3–1.4× faster at (8, 256, 512), more when
fresh pages must be faulted in; its sum of squares (a dot product per row, divided by D) may round apart
from the composite's mean in the last bit. At decode sizes the cost is dispatch, not data: the composite
is seven ops dispatched from C++, and a Python-level one-pass form is slower still (14 µs against 10 µs
for one (1, 1, 512) row, each op a dispatch of its own). There the norm runs as layer_norm of [x, −x],
one native kernel, where that measured faster (bfloat16, and unweighted float32 QK-norms); elsewhere it
stays F.rms_norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many elements the no-grad norm is F.rms_norm (fewer dispatches); from here on the one-output
# form is faster (equal at 64 rows of 512 in float32 on 2 cores).
_ONE_OUTPUT_MIN = 64 * 1024
# Up to how many elements (a few decode rows) a no-grad norm of (dtype, unweighted) runs as one native
# layer_norm kernel (`_rms_norm_symmetric`): where that measured faster than F.rms_norm on 2 cores.
_SYMMETRIC_MAX = {
    (torch.bfloat16, True): 4096,
    (torch.bfloat16, False): 4096,
    (torch.float32, True): 1024,
}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a norm reduces in: float32 for low-precision inputs (as F.rms_norm upcasts), else x's."""
    return torch.promote_types(x.dtype, torch.float32)


def _default_eps(eps: float | None, acc: torch.dtype) -> float:
    # F.rms_norm's default eps is the machine epsilon of the reduction dtype.
    return torch.finfo(acc).eps if eps is None else eps


def _scale(y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """y·weight, in place when the product keeps y's dtype: the numbers of y.mul(weight), one allocation fewer."""
    if weight is None:
        return y
    return y.mul_(weight) if torch.result_type(y, weight) == y.dtype else y.mul(weight)


def _rms_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): the op sequence of ATen's CPU rms_norm composite (x·r·w in the reduction dtype, rounded
    once to x's), so y equals F.rms_norm bit for bit; and the per-row r = (mean(x²) + eps)^(-1/2) (..., 1)
    in the reduction dtype, kept for backward."""
    xf = x.to(_acc_dtype(x))  # no copy in float32
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return _scale(xf.mul(r), weight).type_as(x), r


class _RMSNorm(torch.autograd.Function):
    """y = x·r·w with r = (mean(x²) + eps)^(-1/2) per row; backward by hand from the saved r.

    dx = r·(g·w) − x·r³·mean(g·w·x),   dw = Σ_rows g·x·r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
        y, r = _rms_forward(x, weight, _default_eps(eps, _acc_dtype(x)))
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        acc = r.dtype
        xf, g = x.to(acc), grad.to(acc)  # no-ops in float32
        d = x.shape[-1]
        gx = g * xf  # (..., D): feeds both the row dot products and dw
        rows = gx.reshape(-1, d)
        if weight is None:
            dot = gx.sum(-1, keepdim=True)
            dx = g * r
        else:
            w = weight.to(acc)
            dot = (rows @ w).view(r.shape)
            dx = (g * w).mul_(r)
        dx.addcmul_(xf, r.pow(3).mul_(dot).div_(d), value=-1)
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (r.reshape(1, -1) @ rows).view(-1).to(weight.dtype)
        return dx.to(x.dtype), dw, None


def _rms_norm_symmetric(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMSNorm as LayerNorm of the pair [x, −x]: its mean is 0 and its variance mean(x²), so layer_norm's
    one native CPU kernel computes x·(mean(x²) + eps)^(-1/2)·w. F.rms_norm's composite dispatches seven ops,
    which at decode sizes cost more than the data: (1, 1, 4, 128) QK-norm 9.6 → 7.7 µs in float32,
    11.4 → 7.4 µs in bfloat16; (1, 1, 512) with weight 12.8 → 9.9 µs in bfloat16. The result is the
    composite's within rounding (the pair's mean is zero up to rounding of the sum). Rows come back as a
    strided view of the pair."""
    d = x.shape[-1]
    eps = _default_eps(eps, _acc_dtype(x))
    pair = torch.stack([x, x.neg()], -2)  # (..., 2, D)
    return F.layer_norm(pair, (2, d), None if weight is None else weight.expand(2, d), None, eps).select(
        -2, 0
    )


def _rms_norm_no_grad(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMSNorm without autograd: at decode sizes layer_norm of [x, −x] where that is measured faster, else
    F.rms_norm; at prefill sizes Σx² as a dot product per row and the scale applied in place into the one
    output tensor."""
    d, n = x.shape[-1], x.numel()
    if n <= _SYMMETRIC_MAX.get((x.dtype, weight is None), 0) and (weight is None or weight.dtype == x.dtype):
        return _rms_norm_symmetric(x, weight, eps)
    if n < _ONE_OUTPUT_MIN:
        return torch.rms_norm(x, (d,), weight, eps)  # F.rms_norm's op without its Python wrapper
    acc = _acc_dtype(x)
    xf = x.to(acc)
    r = torch.linalg.vecdot(xf, xf).unsqueeze_(-1).div_(d).add_(_default_eps(eps, acc)).rsqrt_()  # (..., 1)
    return _scale(xf.mul(r), weight).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension with an optional per-channel scale; eps defaults to F.rms_norm's.

    With autograd on CPU: F.rms_norm's numbers and a hand-written backward. Without autograd on CPU: the
    one-output form at prefill sizes (rounding-level differences). Elsewhere F.rms_norm itself (CUDA fuses
    both directions), and whenever torch.compile or torch.export traces (the ONNX and ExecuTorch exports).
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # (a traced graph wants the plain op)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_no_grad(x, weight, eps)


class _ReLU2(torch.autograd.Function):
    """relu(h)², saving r = relu(h) so that backward is one product 2·r·g (exactly autograd's numbers:
    the factor 2 is exact) instead of recomputing relu(h) from h."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r  # what relu(h).square() computes

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(r, grad).mul_(2)


def relu2(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(h)². `inplace`: without autograd, overwrite h (a fresh projection nobody else holds)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _ReLU2.apply(h)
    return F.relu_(h).square_() if inplace else F.relu(h).square_()


def _pairs(x: torch.Tensor, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) as the two halves (a, b) of its hd/2 channel pairs: adjacent channels, or (i, i + hd/2)."""
    if pairing == "half":
        h = x.shape[-1] // 2
        return x[..., :h], x[..., h:]
    pairs = x.unflatten(-1, (-1, 2))
    return pairs[..., 0], pairs[..., 1]


def rotate(x: torch.Tensor, rotation: torch.Tensor, pairing: str) -> torch.Tensor:
    """Turn x's channel pairs (a, b) by the angles whose cosines and sines are `rotation` (2, ·, S, 1, hd/2):
    (a·cos − b·sin, a·sin + b·cos), in float32 or wider, back in x's dtype. Real arithmetic only, so that
    the ONNX and ExecuTorch exporters, which lower no complex tensors, take it; see `apply_rope`."""
    a, b = _pairs(x.to(torch.promote_types(x.dtype, torch.float32)), pairing)
    cos, sin = rotation[0], rotation[1]
    first, second = a * cos - b * sin, a * sin + b * cos
    if pairing == "half":
        return torch.cat([first, second], dim=-1).type_as(x)
    return torch.stack([first, second], dim=-1).flatten(-2).type_as(x)


class _Rotate(torch.autograd.Function):
    """`rotate` with its backward written out: a rotation's adjoint is the rotation by the opposite angles,
    so dx = rotate(g, (cos, −sin)); nothing but the (2, S, hd/2) table is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rotation: torch.Tensor, pairing: str) -> torch.Tensor:
        ctx.save_for_backward(rotation)
        ctx.pairing = pairing
        return rotate(x, rotation, pairing)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rotation,) = ctx.saved_tensors
        inverse = torch.stack([rotation[0], -rotation[1]])
        return rotate(grad, inverse, ctx.pairing), None, None


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor, pairing: str) -> torch.Tensor:
    """`rotate`, through `_Rotate` when x carries gradients and the rotation does not (a table, not a
    parameter): then the backward is one rotation instead of autograd's graph of products and slices."""
    if torch.is_grad_enabled() and x.requires_grad and not rotation.requires_grad:
        return _Rotate.apply(x, rotation, pairing)
    return rotate(x, rotation, pairing)
