"""Which path an op takes: the fused Triton kernel or the pure-torch reference.

One switch for every op in `ops/` (STYLE.md rule 3): the argument `fused=` of the public function wins,
else the process default set by `set_default` (prodistill's `--fused-ops` sets it), else the env var
``PRODISTILL_FUSED_OPS`` (``1``: fused where possible, ``0``: reference everywhere;
unset means ``0``: opt-in until the kernels are measured on a GPU). The fused path exists only for CUDA tensors; CPU tensors always take the reference.
Asking for the fused path on a CUDA tensor without Triton installed is an error, not a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "PRODISTILL_FUSED_OPS"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def fused_available() -> bool:
    """True where the fused kernels can run: a CUDA device and Triton installed (nothing is imported)."""
    return torch.cuda.is_available() and _triton_installed()


_default: bool | None = None


def set_default(fused: bool | None) -> None:
    """Process-wide choice for calls that pass no `fused=` (None: back to the env var)."""
    global _default
    _default = fused


def _requested(fused: bool | None) -> bool:
    if fused is not None:
        return bool(fused)
    if _default is not None:
        return _default
    value = os.environ.get(ENV_VAR, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 (pure-torch reference) or 1 (fused kernels), got {value!r}")
    return value == "1"


def use_fused(t: torch.Tensor, fused: bool | None) -> bool:
    """Whether an op on tensor `t` runs the fused kernel (see the module docstring for the rule)."""
    if not _requested(fused) or t.device.type != "cuda":
        return False
    if not _triton_installed():
        raise RuntimeError(
            f"the fused ops need Triton: install it with `pip install '.[ops]'`, or set {ENV_VAR}=0 "
            "to use the pure-torch reference"
        )
    return True
