"""Channels-last (NHWC) weights for the 2-D convolutions of the step's networks (`--channels-last`).

Why it might pay: profiled on an H200 (SVD-XT, 512², OSV stage 2, compiled and graphed), the convolutions are the
largest kernel family of the step (33 % of its GPU time), and cuDNN runs them on NCHW activations by transposing
each input to NHWC first (1,334 `nchwToNhwcKernel` launches, 40 ms a step). With channels-last weights cuDNN picks
its NHWC kernels, which write NHWC outputs, so the GroupNorm/SiLU that follow and the next convolution stay NHWC.
Measured in the same run, the whole step was no faster (0.943 s/it against 0.936 with NCHW weights), so it is an
option (`--channels-last`, `bench train` configuration `compile+graphs+nhwc`), off by default.

Only the memory format of existing parameters changes (same values, same parameter objects), so every method
and loss is unaffected; calling it again with `channels_last=False` restores contiguous weights (a network shared
by several benchmark configurations is set afresh by each).
"""

from __future__ import annotations

import torch
from torch import nn


def set_conv_layout(networks: list[nn.Module], channels_last: bool) -> int:
    """Make the weight of every `nn.Conv2d` in `networks` channels-last (or contiguous again); returns the weights
    changed. Call it before optimisers are built and before anything is compiled or captured."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    changed, seen = 0, set()
    for net in networks:
        for module in net.modules():
            w = getattr(module, "weight", None)
            if not isinstance(module, nn.Conv2d) or w is None or id(w) in seen:
                continue
            seen.add(id(w))
            if not w.is_contiguous(memory_format=fmt):
                with torch.no_grad():
                    w.data = w.data.contiguous(memory_format=fmt)
                changed += 1
    return changed
