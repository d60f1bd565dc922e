"""Which scaled-dot-product-attention kernel the step uses, chosen by measurement at SVD's shapes.

torch 2.11 on Hopper prefers cuDNN attention where cuDNN is new enough; SVD has two very different
attention shapes — spatial (B·F sequences of h·w tokens, 64-dim heads) and temporal (B·h·w sequences of F = 14
tokens) — plus DINOv2's 257-token images, so the default order is measured here rather than assumed.
`measure` times every backend forward and forward+backward at those shapes (`prodistill bench train
--explain` records the table). Measured on an H100 (bf16, 512², 14 frames; README): cuDNN is fastest for the
spatial attention, where the time is (4096 tokens: 0.68 ms forward vs flash 1.15, memory-efficient 2.38), and
torch's default picks it; memory-efficient wins the 14-token temporal attention by ≈ 0.1 ms a call (under 1 %
of a step). So the step keeps torch's own backend order.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

def svd_attention_shapes(batch: int, frames: int, width: int, height: int, heads=(5, 10, 20, 20),
                         head_dim: int = 64, dino_tokens: int = 257, dino_heads: int = 6) -> list[dict]:
    """(name, batch·heads layout, sequence) of every attention the OSV step runs at a W×H training size:
    the UNet's spatial self-attention and temporal attention per resolution level, and DINOv2's."""
    shapes = []
    h, w = height // 8, width // 8
    for level, n_heads in enumerate(heads[:3]):  # SVD has attention in the first three down levels (+ mid)
        tokens = (h >> level) * (w >> level)
        shapes.append(dict(name=f"spatial {h >> level}x{w >> level}", batch=batch * frames, heads=n_heads,
                           seq=tokens, head_dim=head_dim))
        shapes.append(dict(name=f"temporal {h >> level}x{w >> level}", batch=batch * tokens, heads=n_heads,
                           seq=frames, head_dim=head_dim))
    shapes.append(dict(name="dinov2", batch=batch * frames, heads=dino_heads, seq=dino_tokens, head_dim=64))
    return shapes


def _time_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(shapes: list[dict], device: torch.device, dtype: torch.dtype = torch.bfloat16,
            reps: int = 10) -> list[dict]:
    """Median ms of forward and forward+backward for each backend at each shape (None where a backend
    refuses the shape), plus the backend torch picks by default."""
    rows = []
    for shape in shapes:
        q, k, v = (torch.randn(shape["batch"], shape["heads"], shape["seq"], shape["head_dim"], device=device,
                               dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        row = dict(shape, fwd_ms={}, fwd_bwd_ms={})
        for name, backend in BACKENDS.items():
            def fwd():
                with sdpa_kernel(backend), torch.no_grad():
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)

            def fwd_bwd():
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

            try:
                row["fwd_ms"][name] = _time_ms(fwd, reps)
                row["fwd_bwd_ms"][name] = _time_ms(fwd_bwd, reps)
            except RuntimeError:  # this backend does not take the shape / dtype
                row["fwd_ms"].setdefault(name, None)
                row["fwd_bwd_ms"][name] = None
        row["default_fwd_ms"] = _time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach()), reps)
        rows.append(row)
    return rows

