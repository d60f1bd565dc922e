"""Pseudo-Huber distance per sample (OSV eq. 7/10, after iCT), fused forward and backward.

    d(x, y) = √(‖x − y‖² + c²) − c = s / (√(s + c²) + c),   s = ‖x − y‖²,   one value per sample, fp32.

The second form is the same number without the cancellation of the first when s ≪ c² (early in training
the two latents are close and c ≈ 0.26 for a 14×4×64×64 sample); both the reference and the kernel use it.
Inputs may be bf16; the difference is taken after casting each input to fp32 (fp64 inputs, which only
tests use, stay fp64 and take the reference also on CUDA).

Backward: ∂d/∂x_i = (x_i − y_i)/√(s + c²) = (x_i − y_i)/(d + c), and ∂d/∂y_i = −∂d/∂x_i, each scaled by
the incoming per-sample gradient. c > 0 keeps d + c ≥ c > 0, so the quotient is defined even where x = y.
The gradient towards each input is computed only when that input needs it (OSV and LCM differentiate
only through one of the two), in that input's dtype.

Fused path: one Triton kernel of per-chunk partial sums, one that finishes s and d per sample, and one
elementwise gradient kernel (see `_huber_triton`). It is registered as the custom ops
``prodistill::pseudo_huber`` / ``prodistill::pseudo_huber_grad``, whose CPU kernels are the reference
below, so opcheck and torch.compile see the same op on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops._switch import use_fused


def _acc_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 inputs (tests) stay fp64."""
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


def pseudo_huber_reference(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Plain-torch d(x, y) of shape (B,), fp32 (fp64 for fp64 inputs); autograd gives its backward."""
    acc = _acc_dtype(x, y)
    s = (x.to(acc) - y.to(acc)).pow(2).flatten(1).sum(1)
    return s / ((s + c * c).sqrt() + c)


def _grad_reference(x: Tensor, y: Tensor, d: Tensor, grad: Tensor, c: float, wrt_x: bool) -> Tensor:
    acc = _acc_dtype(x, y)
    scale = (grad.to(acc) / (d + c)).view(-1, *([1] * (x.dim() - 1)))
    g = (x.to(acc) - y.to(acc)) * scale
    return g.to(x.dtype) if wrt_x else (-g).to(y.dtype)


@torch.library.custom_op("prodistill::pseudo_huber", mutates_args=())
def pseudo_huber_op(x: Tensor, y: Tensor, c: float) -> Tensor:
    """d(x, y) per sample, shape (B,). CPU kernel: the reference; CUDA kernel: Triton (fp64: the reference)."""
    return pseudo_huber_reference(x, y, c)


@pseudo_huber_op.register_fake
def _(x: Tensor, y: Tensor, c: float) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x, y))


@pseudo_huber_op.register_kernel("cuda")
def _(x: Tensor, y: Tensor, c: float) -> Tensor:
    if _acc_dtype(x, y) == torch.float64:  # the kernels compute in fp32; fp64 exists for gradcheck
        return pseudo_huber_reference(x, y, c)
    from ops import _huber_triton

    return _huber_triton.forward(x, y, c)


@torch.library.custom_op("prodistill::pseudo_huber_grad", mutates_args=())
def pseudo_huber_grad_op(x: Tensor, y: Tensor, d: Tensor, grad: Tensor, c: float, wrt_x: bool) -> Tensor:
    """grad_b · ∂d_b/∂x (wrt_x) or grad_b · ∂d_b/∂y, shaped and typed like that input."""
    return _grad_reference(x, y, d, grad, c, wrt_x)


@pseudo_huber_grad_op.register_fake
def _(x: Tensor, y: Tensor, d: Tensor, grad: Tensor, c: float, wrt_x: bool) -> Tensor:
    return torch.empty_like(x if wrt_x else y, memory_format=torch.contiguous_format)


@pseudo_huber_grad_op.register_kernel("cuda")
def _(x: Tensor, y: Tensor, d: Tensor, grad: Tensor, c: float, wrt_x: bool) -> Tensor:
    if _acc_dtype(x, y) == torch.float64:
        return _grad_reference(x, y, d, grad, c, wrt_x)
    from ops import _huber_triton

    return _huber_triton.grad(x, y, d, grad, c, wrt_x)


def _setup_context(ctx, inputs, output) -> None:
    x, y, c = inputs
    ctx.save_for_backward(x, y, output)
    ctx.c = c


def _backward(ctx, grad: Tensor):
    x, y, d = ctx.saved_tensors
    dx = pseudo_huber_grad_op(x, y, d, grad, ctx.c, True) if ctx.needs_input_grad[0] else None
    dy = pseudo_huber_grad_op(x, y, d, grad, ctx.c, False) if ctx.needs_input_grad[1] else None
    return dx, dy, None


pseudo_huber_op.register_autograd(_backward, setup_context=_setup_context)


def pseudo_huber(x: Tensor, y: Tensor, c: float, *, fused: bool | None = None) -> Tensor:
    """Per-sample pseudo-Huber distance, shape (B,) fp32 (fp64 for fp64 inputs), for x and y of the same shape (B, ...).

    `fused`: True/False forces the Triton kernel / the plain-torch reference; None follows
    ``PRODISTILL_FUSED_OPS`` (see `ops._switch`). CPU tensors always take the reference.
    """
    if x.shape != y.shape or x.dim() < 1:
        raise ValueError(f"pseudo_huber needs x and y of the same shape (B, ...), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not c > 0:
        raise ValueError(f"pseudo_huber needs c > 0, got {c}")
    if use_fused(x, fused):
        return pseudo_huber_op(x, y, float(c))
    return pseudo_huber_reference(x, y, c)
