"""Triton kernels of the pseudo-Huber distance (math and derivation in `ops.huber`).

Forward, two launches: per (sample, chunk of BLOCK elements) a partial Σ(x − y)² in fp32, then one program
per sample sums its partials in a fixed order (deterministic, no atomics) and writes d. A 14×4×64×64
sample is 112 chunks, so the grid fills the GPU even with one sample. Backward, one elementwise launch
that reads x and y once and writes the gradient for one input in its dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops import _triton_common as common

BLOCK = 2048  # elements per program: 16 per thread at 4 warps, i.e. two 16-byte loads of bf16
FINISH_BLOCK = 1024


@triton.jit
def _partial_sq_kernel(x_ptr, y_ptr, part_ptr, numel_per_sample, n_chunks, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k = tl.program_id(1)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_per_sample
    base = b * numel_per_sample
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    diff = x - y
    tl.store(part_ptr + b * n_chunks + k, tl.sum(diff * diff, axis=0))


@triton.jit
def _finish_kernel(part_ptr, d_ptr, n_chunks, c, BLOCK: tl.constexpr, N_ITERS: tl.constexpr):
    b = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for it in tl.static_range(N_ITERS):  # one iteration up to 2 M elements per sample
        offs = it * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + b * n_chunks + offs, mask=offs < n_chunks, other=0.0)
    s = tl.sum(acc, axis=0)
    tl.store(d_ptr + b, s / (tl.sqrt_rn(s + c * c) + c))


@triton.jit
def _grad_kernel(x_ptr, y_ptr, d_ptr, g_ptr, out_ptr, numel_per_sample, c, sign, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k = tl.program_id(1)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_per_sample
    base = b * numel_per_sample
    scale = sign * tl.load(g_ptr + b).to(tl.float32) / (tl.load(d_ptr + b) + c)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, ((x - y) * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _chunks(x: torch.Tensor) -> tuple[int, int, int]:
    """(B, elements per sample, chunks per sample); a grid's second axis holds at most 65535 chunks."""
    common.check_int32(x)
    batch = x.shape[0]
    numel = x.numel() // batch if batch else 0
    n_chunks = triton.cdiv(numel, BLOCK)
    if n_chunks > 65535:
        raise ValueError(f"fused pseudo_huber: {numel} elements per sample exceed the kernel's {65535 * BLOCK}")
    return batch, numel, n_chunks


def forward(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """d of shape (B,) fp32 for x, y of shape (B, ...)."""
    x, y = x.contiguous(), y.contiguous()
    batch, numel, n_chunks = _chunks(x)
    d = common.empty((batch,), torch.float32, x.device)
    if batch == 0:
        return d
    partials = common.empty((batch, n_chunks), torch.float32, x.device)
    _partial_sq_kernel[(batch, n_chunks)](x, y, partials, numel, n_chunks, BLOCK=BLOCK, num_warps=4)
    _finish_kernel[(batch,)](partials, d, n_chunks, float(c), BLOCK=FINISH_BLOCK,
                             N_ITERS=triton.cdiv(n_chunks, FINISH_BLOCK), num_warps=4)
    return d


def grad(x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, grad_b: torch.Tensor, c: float, wrt_x: bool) -> torch.Tensor:
    """grad_b · ∂d/∂x (wrt_x) or grad_b · ∂d/∂y, in the dtype of that input."""
    x, y, d, grad_b = x.contiguous(), y.contiguous(), d.contiguous(), grad_b.contiguous()  # grad of .mean() is an expand
    batch, numel, n_chunks = _chunks(x)
    out = common.empty(x.shape, (x if wrt_x else y).dtype, x.device)
    if batch and numel:
        _grad_kernel[(batch, n_chunks)](x, y, d, grad_b, out, numel, float(c), 1.0 if wrt_x else -1.0,
                                        BLOCK=BLOCK, num_warps=4)
    return out
