"""The OSV latent upsampler as one fused op: conv3x3 → PixelShuffle(r) → GroupNorm(1 group) with affine.

Exactly `prodistill.models.discriminator.LatentUpsampler` (whose docstring gives the op order)::

    y   = conv2d(x, conv_w, conv_b, padding=1)     # (N, Cin, h, w) -> (N, C·r², h, w)
    y   = pixel_shuffle(y, r)                      # -> (N, C, h·r, w·r); channel c·r²+i·r+j -> offset (i, j)
    out = group_norm(y, 1, gn_w, gn_b, eps)        # per image: μ, σ² over all C·h·r·w·r values (biased σ²)

What is fused (`_upsampler_triton`): the conv output is never written to memory. The conv is tiny
(Cin·9 = 36 multiply-adds per output value), so each kernel recomputes it from the latents in registers
instead of reading a stored copy: forward = a statistics pass (conv + per-tile mean and centred sum of
squares) and a write pass (conv + shuffle + normalise + affine, stored once in the shuffled layout).
The backward recomputes the conv again, reduces the two per-image sums the norm's gradient needs, writes
the pre-shuffle gradient once (fp32), and two last kernels turn it into the latents' and the conv weights'
gradients. The eager sequence instead writes and re-reads the conv output and the shuffled copy in both
directions.

The trade, in numbers, at the real shape (14×4×64×64 latents, r = 4, bf16): the output and the conv
output are 2.75 M values each (5.5 MB), the latents 0.46 MB. Eager forward moves ≈ 30 MB (conv write,
shuffle read + write, norm's two reads + write), torch.compile's ≈ 22 MB (conv write, then one fused
shuffle + norm kernel reading twice and writing), this op ≈ 6.5 MB (latents read twice, output written
once). Each recompute of the conv is 2.75 M × 36 ≈ 0.1 G fp32 multiply-adds, ≈ 3 µs at an H100's
≈ 30 T FMA/s, about what moving 5.5 MB costs at ≈ 3 TB/s: the op recomputes 4 times (2 forward,
2 backward) to save ≈ 6 tensor passes, so it is not a certain win over torch.compile — `python3 -m
ops.bench` decides, and `PRODISTILL_FUSED_OPS` picks the default accordingly.

Backward of the norm (one group, M = C·H·W values per image, x̂ = (y − μ)·rstd, g = ∂L/∂out)::

    ∂L/∂gn_b[c] = Σ_{n,p} g[n,c,p]        ∂L/∂gn_w[c] = Σ_{n,p} g[n,c,p]·x̂[n,c,p]
    ĝ = g·gn_w[c]                         (gradient w.r.t. x̂)
    ∂L/∂y = rstd · (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)),   means over the M values of the image

(from x̂ = (y − μ)/σ: ∂μ/∂y = 1/M and ∂σ/∂y = x̂/M, so the Jacobian of x̂ is rstd·(I − 1/M − x̂x̂ᵀ/M)).
Then the conv's backward: with ∂L/∂y un-shuffled to dy (N, C·r², h, w),
∂L/∂x[ci, p] = Σ_{o,kh,kw} dy[o, p − (kh−1, kw−1)]·conv_w[o, ci, kh, kw],
∂L/∂conv_w[o, ci, kh, kw] = Σ_{n,p} dy[o, p]·x[ci, p + (kh−1, kw−1)], ∂L/∂conv_b[o] = Σ_{n,p} dy[o, p].

Why `torch.library.custom_op` around Triton and not `triton_op`: the op's fake kernel and autograd are
written once and do not depend on Triton, and its CPU kernel is the plain-torch version below, so the same
op runs, traces under torch.compile and passes opcheck on a CPU-only machine without Triton installed;
on CUDA it dispatches to the Triton kernels. torch.compile sees one opaque node per direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._switch import use_fused


def _conv_shuffle(x: Tensor, conv_w: Tensor, conv_b: Tensor, r: int) -> Tensor:
    return F.pixel_shuffle(F.conv2d(x, conv_w, conv_b, padding=1), r)


def latent_upsampler_reference(x: Tensor, conv_w: Tensor, conv_b: Tensor, gn_w: Tensor, gn_b: Tensor,
                               r: int, eps: float) -> Tensor:
    """Plain-torch upsampler, the same calls `LatentUpsampler` makes; autograd gives its backward."""
    return F.group_norm(_conv_shuffle(x, conv_w, conv_b, r), 1, gn_w, gn_b, eps)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics and backward math in fp32 for bf16/fp16/fp32 inputs; fp64 inputs (tests) stay fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _forward_reference(x, conv_w, conv_b, gn_w, gn_b, r, eps):
    acc = _stat_dtype(x)  # CPU group norm keeps bf16 statistics for bf16 input; the backward wants fp32 ones
    y = _conv_shuffle(x, conv_w, conv_b, r)
    n, c, hh, ww = y.shape
    out, mean, rstd = torch.native_group_norm(y.to(acc), gn_w.to(acc), gn_b.to(acc), n, c, hh * ww, 1, eps)
    return out.to(x.dtype), mean.view(n), rstd.view(n)


@torch.library.custom_op("prodistill::latent_upsampler", mutates_args=())
def latent_upsampler_op(x: Tensor, conv_w: Tensor, conv_b: Tensor, gn_w: Tensor, gn_b: Tensor, r: int,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out (N, C, h·r, w·r), mean (N,), rstd (N,)); the fp32 statistics are saved for the backward.

    CPU kernel: the plain-torch sequence; CUDA kernel: Triton (fp64, which only tests use: plain torch)."""
    return _forward_reference(x, conv_w, conv_b, gn_w, gn_b, r, eps)


@latent_upsampler_op.register_fake
def _(x, conv_w, conv_b, gn_w, gn_b, r, eps):
    n, _, h, w = x.shape
    out = x.new_empty((n, conv_w.shape[0] // (r * r), h * r, w * r))
    return out, x.new_empty((n,), dtype=_stat_dtype(x)), x.new_empty((n,), dtype=_stat_dtype(x))


@latent_upsampler_op.register_kernel("cuda")
def _(x, conv_w, conv_b, gn_w, gn_b, r, eps):
    if x.dtype == torch.float64:
        return _forward_reference(x, conv_w, conv_b, gn_w, gn_b, r, eps)
    from ops import _upsampler_triton

    return _upsampler_triton.forward(x, conv_w, conv_b, gn_w, gn_b, r, eps)


def _backward_reference(grad, x, conv_w, conv_b, gn_w, mean, rstd, r):
    acc = _stat_dtype(x)
    y = _conv_shuffle(x, conv_w, conv_b, r).to(acc)
    stat = (-1, 1, 1, 1)
    x_hat = (y - mean.view(stat)) * rstd.view(stat)
    g = grad.to(acc)
    d_gn_b = g.sum((0, 2, 3))
    d_gn_w = (g * x_hat).sum((0, 2, 3))
    g_hat = g * gn_w.to(acc).view(1, -1, 1, 1)
    dy = rstd.view(stat) * (g_hat - g_hat.mean((1, 2, 3), keepdim=True)
                            - x_hat * (g_hat * x_hat).mean((1, 2, 3), keepdim=True))
    dx, d_conv_w, d_conv_b = torch.ops.aten.convolution_backward(
        F.pixel_unshuffle(dy, r), x.to(acc), conv_w.to(acc), [conv_w.shape[0]], [1, 1], [1, 1], [1, 1],
        False, [0, 0], 1, [True, True, True])
    return (dx.to(x.dtype), d_conv_w.to(conv_w.dtype), d_conv_b.to(conv_b.dtype), d_gn_w.to(gn_w.dtype),
            d_gn_b.to(gn_w.dtype))


@torch.library.custom_op("prodistill::latent_upsampler_backward", mutates_args=())
def latent_upsampler_backward_op(grad: Tensor, x: Tensor, conv_w: Tensor, conv_b: Tensor, gn_w: Tensor,
                                 mean: Tensor, rstd: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂conv_w, ∂conv_b, ∂gn_w, ∂gn_b) by the formulas of the module docstring (CPU: in plain torch)."""
    return _backward_reference(grad, x, conv_w, conv_b, gn_w, mean, rstd, r)


@latent_upsampler_backward_op.register_fake
def _(grad, x, conv_w, conv_b, gn_w, mean, rstd, r):
    return (torch.empty_like(x), torch.empty_like(conv_w), torch.empty_like(conv_b), torch.empty_like(gn_w),
            torch.empty_like(gn_w))


@latent_upsampler_backward_op.register_kernel("cuda")
def _(grad, x, conv_w, conv_b, gn_w, mean, rstd, r):
    if x.dtype == torch.float64:
        return _backward_reference(grad, x, conv_w, conv_b, gn_w, mean, rstd, r)
    from ops import _upsampler_triton

    return _upsampler_triton.backward(grad, x, conv_w, conv_b, gn_w, mean, rstd, r)


def _setup_context(ctx, inputs, output) -> None:
    x, conv_w, conv_b, gn_w, _gn_b, r, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, conv_w, conv_b, gn_w, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.r = r


def _backward(ctx, grad: Tensor, _grad_mean, _grad_rstd):
    x, conv_w, conv_b, gn_w, mean, rstd = ctx.saved_tensors
    grads = latent_upsampler_backward_op(grad, x, conv_w, conv_b, gn_w, mean, rstd, ctx.r)
    return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None


latent_upsampler_op.register_autograd(_backward, setup_context=_setup_context)


def fused_latent_upsampler(x: Tensor, conv_w: Tensor, conv_b: Tensor, gn_w: Tensor, gn_b: Tensor, r: int,
                           eps: float, *, fused: bool | None = None) -> Tensor:
    """`LatentUpsampler` as one op: (N, Cin, h, w) latents -> (N, C, h·r, w·r), C = conv_w.shape[0] / r².

    All five tensors must share a dtype (as the module's own conv requires). `fused`: True/False forces the
    Triton kernels / the plain-torch reference; None follows ``PRODISTILL_FUSED_OPS`` (see `ops._switch`).
    """
    if x.dim() != 4 or conv_w.dim() != 4 or tuple(conv_w.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"expected x (N, Cin, h, w) and conv_w (C·r², Cin, 3, 3), got {tuple(x.shape)} and "
                         f"{tuple(conv_w.shape)}")
    if r < 1 or conv_w.shape[0] % (r * r) or gn_w.shape != (conv_w.shape[0] // (r * r),):
        raise ValueError(f"conv_w has {conv_w.shape[0]} output channels: it must be C·r² for r = {r} and "
                         f"gn_w must have C entries, got {tuple(gn_w.shape)}")
    if len({t.dtype for t in (x, conv_w, conv_b, gn_w, gn_b)}) != 1:
        raise ValueError("latent upsampler: x and its four parameters must share a dtype, got "
                         f"{[str(t.dtype) for t in (x, conv_w, conv_b, gn_w, gn_b)]}")
    if use_fused(x, fused):
        return latent_upsampler_op(x, conv_w, conv_b, gn_w, gn_b, int(r), float(eps))[0]
    return latent_upsampler_reference(x, conv_w, conv_b, gn_w, gn_b, r, eps)
