"""Fused ops for the training step (SPEC §4): the OSV latent upsampler and the pseudo-Huber distance.

Each op has a pure-torch reference (what CPU runs use and tests compare against) and a fused Triton
forward and backward for CUDA tensors, registered through `torch.library` so torch.compile keeps one
graph. One switch picks the path: the `fused=` argument, else ``PRODISTILL_FUSED_OPS=0|1`` (unset: 1);
see `ops._switch`. Importing `ops` registers the ops' schemas only: Triton is imported, and the kernels
compiled, on the first fused call (Triton caches the builds in its folder, ``~/.triton/cache`` or
``$TRITON_CACHE_DIR``, so later processes skip the build).

    ops.pseudo_huber(x, y, c)                                              # (B,) fp32
    ops.fused_latent_upsampler(x, conv_w, conv_b, gn_w, gn_b, r, eps)      # (N, C, h·r, w·r)
    ops.fused_available()                                                  # CUDA + Triton present
"""

from ops._switch import ENV_VAR, fused_available, set_default, use_fused
from ops.huber import pseudo_huber, pseudo_huber_reference
from ops.upsampler import fused_latent_upsampler, latent_upsampler_reference

__all__ = [
    "ENV_VAR",
    "fused_available",
    "set_default",
    "use_fused",
    "pseudo_huber",
    "pseudo_huber_reference",
    "fused_latent_upsampler",
    "latent_upsampler_reference",
]
