"""What the Triton kernel modules share; importing this imports Triton, so only the CUDA kernels do it.

Triton's compile cache goes under ``$PRODISTILL_CACHE/triton`` (default ``~/.cache/prodistill/triton``)
unless ``TRITON_CACHE_DIR`` is already set, so a first use builds the kernels and later runs reuse them.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "TRITON_CACHE_DIR",
    os.path.join(os.path.expanduser(os.environ.get("PRODISTILL_CACHE") or "~/.cache/prodistill"), "triton"),
)

import torch  # noqa: E402
import triton  # noqa: E402,F401  (re-exported for the kernel modules)

INT32_LIMIT = 2**31 - 1


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here, so a test can hand out NaN-filled ones instead."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_int32(*tensors: torch.Tensor) -> None:
    """The kernels index with 32-bit offsets; refuse tensors too large for that instead of corrupting memory."""
    for t in tensors:
        if t.numel() > INT32_LIMIT:
            raise ValueError(f"fused op: a tensor of {t.numel()} elements exceeds the kernels' 32-bit indexing")
