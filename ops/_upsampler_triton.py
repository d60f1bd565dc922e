"""Triton kernels of the fused latent upsampler (math, derivation and what is fused: `ops.upsampler`).

Tiling. A program of the four conv/norm kernels owns one image n, one output channel c and ROWS latent
rows, and holds its values as a 4-D tile [ROWS, r, w, r] indexed (latent row, sub-row i, latent column,
sub-column j): in that order the tile *is* the shuffled output's memory (rows ph·r + i, columns pw·r + j),
so loads of the incoming gradient and stores of the output are contiguous runs. Conv channel
c·r² + i·r + j is the tile's (i, j) slot, so the 3×3 conv is 36 broadcast multiply-adds of a shifted
[ROWS, 1, w, 1] latent slice by a [1, r, 1, r] weight slice, all in fp32 registers.

Group statistics are reduced without atomics: each program stores its tile's sum and centred sum of
squares, and every program of the next pass combines all of its image's partials (C·h/ROWS of them)
with Chan's parallel-variance formula, which does not lose precision when |μ| ≫ σ as Σy² − (Σy)²/M does.

Kernels: forward `_stats` → `_normalize`; backward `_grad_stats` → `_grad_pre_shuffle` → `_grad_input`
and `_grad_weight`. The last two work on [pixels, r²] tiles of the pre-shuffle gradient: ∂L/∂x sums
shifted tiles times weight slices over the 9·C (c, tap) pairs; ∂L/∂conv_w is a [r², pixels] × [pixels,
Cin·9] product with the im2col patches in IEEE fp32 (no TF32), one partial per program, summed in a fixed
order afterwards. (One kernel doing both spilled registers to local memory in sm_90 builds.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops import _triton_common as common

ROWS = 2  # latent rows per program in the conv/norm kernels: a 2×4×64×4 tile = 2048 fp32 values
CONV_ROWS = 2  # latent rows per program in `_grad_input` / `_grad_weight`: 128 pixels


@triton.jit
def _tile_index(rb, ROWS: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr):
    ph = rb * ROWS + tl.arange(0, ROWS)[:, None, None, None]
    i = tl.arange(0, RP)[None, :, None, None]
    pw = tl.arange(0, WP)[None, None, :, None]
    j = tl.arange(0, RP)[None, None, None, :]
    return ph, i, pw, j


@triton.jit
def _conv_tile(x_ptr, w_ptr, b_ptr, n, c, ph, i, pw, j, h, w, CIN: tl.constexpr, R: tl.constexpr,
               ROWS: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr):
    """Conv output of channels c·r² + (i, j) at latent pixels (ph, pw), as an fp32 [ROWS, RP, WP, RP] tile."""
    sub_ok = (i < R) & (j < R)
    o = c * (R * R) + i * R + j
    acc = tl.zeros([ROWS, RP, WP, RP], tl.float32) + tl.load(b_ptr + o, mask=sub_ok, other=0.0).to(tl.float32)
    x_img = x_ptr + n * (CIN * h * w)
    for ci in tl.static_range(CIN):
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                yy = ph + (kh - 1)
                xx = pw + (kw - 1)
                inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                xv = tl.load(x_img + ci * h * w + yy * w + xx, mask=inside, other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + o * (CIN * 9) + (ci * 9 + kh * 3 + kw), mask=sub_ok, other=0.0).to(tl.float32)
                acc += xv * wv
    valid = (ph < h) & sub_ok & (pw < w)
    return acc, valid


@triton.jit
def _out_offsets(n, c, C, ph, i, pw, j, h, w, R: tl.constexpr):
    return ((n * C + c) * (h * R) + ph * R + i) * (w * R) + pw * R + j


@triton.jit
def _tile_count(rb, h, w, R: tl.constexpr, ROWS: tl.constexpr):
    return (tl.minimum(h - rb * ROWS, ROWS) * (R * R) * w).to(tl.float32)


@triton.jit
def _stats_kernel(x_ptr, w_ptr, b_ptr, psum_ptr, pm2_ptr, h, w, n_rb, CIN: tl.constexpr, R: tl.constexpr,
                  ROWS: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    rb = tl.program_id(2)
    ph, i, pw, j = _tile_index(rb, ROWS, RP, WP)
    y, valid = _conv_tile(x_ptr, w_ptr, b_ptr, n, c, ph, i, pw, j, h, w, CIN, R, ROWS, RP, WP)
    s = tl.sum(tl.where(valid, y, 0.0))
    dev = tl.where(valid, y - s / _tile_count(rb, h, w, R, ROWS), 0.0)
    idx = (n * tl.num_programs(1) + c) * n_rb + rb
    tl.store(psum_ptr + idx, s)
    tl.store(pm2_ptr + idx, tl.sum(dev * dev))


@triton.jit
def _group_stats(psum_ptr, pm2_ptr, n, n_parts, n_rb, h, w, eps, R: tl.constexpr, ROWS: tl.constexpr,
                 PP: tl.constexpr):
    """(μ, rstd) of image n from its tiles' (sum, centred sum of squares), by Chan's formula."""
    p = tl.arange(0, PP)
    ok = p < n_parts
    s = tl.load(psum_ptr + n * n_parts + p, mask=ok, other=0.0)
    m2 = tl.load(pm2_ptr + n * n_parts + p, mask=ok, other=0.0)
    cnt = _tile_count(p % n_rb, h, w, R, ROWS)
    total = tl.sum(tl.where(ok, cnt, 0.0))
    mean = tl.sum(s) / total
    delta = tl.where(ok, s / cnt - mean, 0.0)
    var = tl.sum(m2 + cnt * delta * delta) / total
    return mean, 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _normalize_kernel(x_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, psum_ptr, pm2_ptr, out_ptr, mean_ptr, rstd_ptr,
                      h, w, n_rb, eps, CIN: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
                      RP: tl.constexpr, WP: tl.constexpr, PP: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    rb = tl.program_id(2)
    C = tl.num_programs(1)
    mean, rstd = _group_stats(psum_ptr, pm2_ptr, n, C * n_rb, n_rb, h, w, eps, R, ROWS, PP)
    ph, i, pw, j = _tile_index(rb, ROWS, RP, WP)
    y, valid = _conv_tile(x_ptr, w_ptr, b_ptr, n, c, ph, i, pw, j, h, w, CIN, R, ROWS, RP, WP)
    scale = rstd * tl.load(gw_ptr + c).to(tl.float32)
    out = (y - mean) * scale + tl.load(gb_ptr + c).to(tl.float32)
    tl.store(out_ptr + _out_offsets(n, c, C, ph, i, pw, j, h, w, R), out.to(out_ptr.dtype.element_ty), mask=valid)
    first = (c == 0) & (rb == 0)
    tl.store(mean_ptr + n, mean, mask=first)
    tl.store(rstd_ptr + n, rstd, mask=first)


@triton.jit
def _grad_stats_kernel(g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, psg_ptr, psgx_ptr, h, w, n_rb,
                       CIN: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    rb = tl.program_id(2)
    C = tl.num_programs(1)
    ph, i, pw, j = _tile_index(rb, ROWS, RP, WP)
    y, valid = _conv_tile(x_ptr, w_ptr, b_ptr, n, c, ph, i, pw, j, h, w, CIN, R, ROWS, RP, WP)
    x_hat = (y - tl.load(mean_ptr + n)) * tl.load(rstd_ptr + n)
    g = tl.load(g_ptr + _out_offsets(n, c, C, ph, i, pw, j, h, w, R), mask=valid, other=0.0).to(tl.float32)
    idx = (n * C + c) * n_rb + rb
    tl.store(psg_ptr + idx, tl.sum(g))
    tl.store(psgx_ptr + idx, tl.sum(g * x_hat))


@triton.jit
def _grad_pre_shuffle_kernel(g_ptr, x_ptr, w_ptr, b_ptr, gw_ptr, mean_ptr, rstd_ptr, psg_ptr, psgx_ptr, dy_ptr,
                             h, w, n_rb, CIN: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
                             RP: tl.constexpr, WP: tl.constexpr, PP: tl.constexpr):
    """∂L/∂y = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), stored fp32 in the shuffled layout."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    rb = tl.program_id(2)
    C = tl.num_programs(1)
    p = tl.arange(0, PP)
    ok = p < C * n_rb
    gamma_p = tl.load(gw_ptr + p // n_rb, mask=ok, other=0.0).to(tl.float32)
    sg = tl.load(psg_ptr + n * C * n_rb + p, mask=ok, other=0.0)
    sgx = tl.load(psgx_ptr + n * C * n_rb + p, mask=ok, other=0.0)
    total = (C * h * w * R * R).to(tl.float32)
    mean_g = tl.sum(gamma_p * sg) / total
    mean_gx = tl.sum(gamma_p * sgx) / total
    mean = tl.load(mean_ptr + n)
    rstd = tl.load(rstd_ptr + n)
    ph, i, pw, j = _tile_index(rb, ROWS, RP, WP)
    y, valid = _conv_tile(x_ptr, w_ptr, b_ptr, n, c, ph, i, pw, j, h, w, CIN, R, ROWS, RP, WP)
    x_hat = (y - mean) * rstd
    offs = _out_offsets(n, c, C, ph, i, pw, j, h, w, R)
    g_hat = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32) * tl.load(gw_ptr + c).to(tl.float32)
    tl.store(dy_ptr + offs, rstd * (g_hat - mean_g - x_hat * mean_gx), mask=valid)


@triton.jit
def _conv_grad_index(rb, h, w, R: tl.constexpr, ROWS: tl.constexpr, WP: tl.constexpr, SP: tl.constexpr):
    """Pixels (ph, pw) of a [ROWS·WP]-pixel tile, and the r² sub-pixels s with their shuffled-layout offsets."""
    q = tl.arange(0, ROWS * WP)
    ph = rb * ROWS + q // WP
    pw = q % WP
    s = tl.arange(0, SP)
    return ph, pw, (ph < h) & (pw < w), s, s < R * R, (s // R) * (w * R) + s % R


@triton.jit
def _grad_input_kernel(dy_ptr, w_ptr, dx_ptr, h, w, C: tl.constexpr, CIN: tl.constexpr, R: tl.constexpr,
                       ROWS: tl.constexpr, WP: tl.constexpr, SP: tl.constexpr, CIP: tl.constexpr):
    """∂L/∂x[ci, p] = Σ_{c, s, tap} dy[c·r² + s, p − tap] · conv_w[c·r² + s, ci, tap] for ROWS rows of image n.

    Accumulates [pixels, r², Cin] products over the 9·C (c, tap) pairs and reduces over r² once at the end:
    Cin = 4 is too narrow for a matrix product (its minimum width 16 would waste 4× the multiply-adds)."""
    n = tl.program_id(0)
    rb = tl.program_id(1)
    ph, pw, pix_ok, s, s_ok, sub = _conv_grad_index(rb, h, w, R, ROWS, WP, SP)
    ci = tl.arange(0, CIP)
    ci_ok = ci < CIN
    dx = tl.zeros([ROWS * WP, SP, CIP], tl.float32)
    for c in range(C):
        dy_img = dy_ptr + (n * C + c) * (h * R * w * R)
        for tap in range(9):
            a = ph - (tap // 3 - 1)
            b = pw - (tap % 3 - 1)
            src_ok = pix_ok & (a >= 0) & (a < h) & (b >= 0) & (b < w)
            dy = tl.load(dy_img + (a * R * (w * R) + b * R)[:, None] + sub[None, :],
                         mask=src_ok[:, None] & s_ok[None, :], other=0.0)  # [pixels, SP]
            wt = tl.load(w_ptr + (c * R * R + s)[:, None] * (CIN * 9) + ci[None, :] * 9 + tap,
                         mask=s_ok[:, None] & ci_ok[None, :], other=0.0).to(tl.float32)  # [SP, CIP]
            dx += dy[:, :, None] * wt[None, :, :]
    dst = dx_ptr + n * (CIN * h * w) + ci[None, :] * (h * w) + (ph * w + pw)[:, None]
    tl.store(dst, tl.sum(dx, axis=1).to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & ci_ok[None, :])


@triton.jit
def _grad_weight_kernel(dy_ptr, x_ptr, pdw_ptr, pdb_ptr, h, w, n_rb, C: tl.constexpr, CIN: tl.constexpr,
                        R: tl.constexpr, ROWS: tl.constexpr, WP: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr):
    """This tile's share of ∂L/∂conv_w = dyᵀ · im2col(x) ([r², pixels] × [pixels, Cin·9] per c) and ∂L/∂conv_b."""
    n = tl.program_id(0)
    rb = tl.program_id(1)
    ph, pw, pix_ok, s, s_ok, sub = _conv_grad_index(rb, h, w, R, ROWS, WP, SP)
    k = tl.arange(0, KP)  # im2col column (ci, kh, kw)
    k_ok = k < CIN * 9
    yy = ph[:, None] + (k % 9 // 3)[None, :] - 1
    xx = pw[:, None] + (k % 3)[None, :] - 1
    inside = pix_ok[:, None] & k_ok[None, :] & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    patches = tl.load(x_ptr + n * (CIN * h * w) + (k // 9)[None, :] * (h * w) + yy * w + xx, mask=inside,
                      other=0.0).to(tl.float32)  # [pixels, KP]
    part = n * n_rb + rb
    for c in range(C):
        dy = tl.load(dy_ptr + (n * C + c) * (h * R * w * R) + (ph * R * (w * R) + pw * R)[:, None] + sub[None, :],
                     mask=pix_ok[:, None] & s_ok[None, :], other=0.0)  # [pixels, SP]
        dw = tl.dot(tl.trans(dy), patches, input_precision="ieee")  # [SP, KP]
        row = part * (C * R * R) + c * R * R + s
        tl.store(pdw_ptr + row[:, None] * (CIN * 9) + k[None, :], dw, mask=s_ok[:, None] & k_ok[None, :])
        tl.store(pdb_ptr + row, tl.sum(dy, axis=0), mask=s_ok)


def _pow2(v: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(v))


def _geometry(x: torch.Tensor, conv_w: torch.Tensor, r: int) -> dict:
    n, cin, h, w = x.shape
    if cin > 16:
        raise ValueError(f"fused latent upsampler supports at most 16 latent channels, got {cin}")
    return dict(n=n, cin=cin, h=h, w=w, c=conv_w.shape[0] // (r * r), n_rb=triton.cdiv(h, ROWS),
                rp=_pow2(r), wp=_pow2(w))


def forward(x, conv_w, conv_b, gn_w, gn_b, r: int, eps: float):
    """(out, mean, rstd) as `ops.upsampler.latent_upsampler_op` defines them."""
    x, conv_w, conv_b, gn_w, gn_b = (t.contiguous() for t in (x, conv_w, conv_b, gn_w, gn_b))
    geo = _geometry(x, conv_w, r)
    n, c, h, w, n_rb = geo["n"], geo["c"], geo["h"], geo["w"], geo["n_rb"]
    out = common.empty((n, c, h * r, w * r), x.dtype, x.device)
    common.check_int32(x, out)
    mean = common.empty((n,), torch.float32, x.device)
    rstd = common.empty((n,), torch.float32, x.device)
    if out.numel() == 0:
        return out, mean, rstd
    psum = common.empty((n, c * n_rb), torch.float32, x.device)
    pm2 = common.empty((n, c * n_rb), torch.float32, x.device)
    tile = dict(CIN=geo["cin"], R=r, ROWS=ROWS, RP=geo["rp"], WP=geo["wp"], num_warps=4)
    grid = (n, c, n_rb)
    _stats_kernel[grid](x, conv_w, conv_b, psum, pm2, h, w, n_rb, **tile)
    _normalize_kernel[grid](x, conv_w, conv_b, gn_w, gn_b, psum, pm2, out, mean, rstd, h, w, n_rb, float(eps),
                            PP=_pow2(c * n_rb), **tile)
    return out, mean, rstd


def backward(grad, x, conv_w, conv_b, gn_w, mean, rstd, r: int):
    """(∂x, ∂conv_w, ∂conv_b, ∂gn_w, ∂gn_b) as `ops.upsampler.latent_upsampler_backward_op` defines them."""
    grad, x, conv_w, conv_b, gn_w = (t.contiguous() for t in (grad, x, conv_w, conv_b, gn_w))
    if grad.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (x, conv_w, conv_b, gn_w, gn_w))
    geo = _geometry(x, conv_w, r)
    n, cin, c, h, w, n_rb = geo["n"], geo["cin"], geo["c"], geo["h"], geo["w"], geo["n_rb"]
    dev = x.device
    common.check_int32(grad)
    psg = common.empty((n, c * n_rb), torch.float32, dev)
    psgx = common.empty((n, c * n_rb), torch.float32, dev)
    dy = common.empty(grad.shape, torch.float32, dev)
    dx = common.empty(x.shape, x.dtype, dev)
    n_crb = triton.cdiv(h, CONV_ROWS)
    pdw = common.empty((n * n_crb, c * r * r, cin * 9), torch.float32, dev)
    pdb = common.empty((n * n_crb, c * r * r), torch.float32, dev)
    tile = dict(CIN=cin, R=r, ROWS=ROWS, RP=geo["rp"], WP=geo["wp"], num_warps=4)
    grid = (n, c, n_rb)
    _grad_stats_kernel[grid](grad, x, conv_w, conv_b, mean, rstd, psg, psgx, h, w, n_rb, **tile)
    _grad_pre_shuffle_kernel[grid](grad, x, conv_w, conv_b, gn_w, mean, rstd, psg, psgx, dy, h, w, n_rb,
                                   PP=_pow2(c * n_rb), **tile)
    conv_tile = dict(C=c, CIN=cin, R=r, ROWS=CONV_ROWS, WP=geo["wp"], SP=_pow2(r * r, 16), num_warps=8)
    _grad_input_kernel[(n, n_crb)](dy, conv_w, dx, h, w, CIP=_pow2(cin), **conv_tile)
    _grad_weight_kernel[(n, n_crb)](dy, x, pdw, pdb, h, w, n_crb, KP=_pow2(cin * 9, 16), **conv_tile)
    d_gn_b = psg.view(n, c, n_rb).sum((0, 2))
    d_gn_w = psgx.view(n, c, n_rb).sum((0, 2))
    return (dx, pdw.sum(0).view_as(conv_w).to(conv_w.dtype), pdb.sum(0).to(conv_b.dtype), d_gn_w.to(gn_w.dtype),
            d_gn_b.to(gn_w.dtype))
