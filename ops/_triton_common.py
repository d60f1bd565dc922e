"""What the Triton kernel modules share: buffer allocation and the 32-bit indexing limit."""

from __future__ import annotations

import torch

INT32_LIMIT = 2**31 - 1


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here, so a test can hand out NaN-filled ones instead."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_int32(*tensors: torch.Tensor) -> None:
    """The kernels index with 32-bit offsets; refuse tensors too large for that instead of corrupting memory."""
    for t in tensors:
        if t.numel() > INT32_LIMIT:
            raise ValueError(f"fused op: a tensor of {t.numel()} elements exceeds the kernels' 32-bit indexing")
