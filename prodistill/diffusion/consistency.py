"""The consistency parameterisation (OSV eq. 4) on top of an EDM denoiser.

    f_θ(x, σ) = c_skip^CM(σ)·x + c_out^CM(σ)·D_θ(x, σ)

with the coefficients of Song et al. (consistency models), shifted so that the boundary condition holds
exactly at σ_min: c_skip^CM(σ_min) = 1, c_out^CM(σ_min) = 0, i.e. f(x, σ_min) = x. σ_data = 1 for SVD.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from prodistill.diffusion.edm import SIGMA_MIN, append_dims

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""D(x, σ) -> x0 estimate; x is (B, ...) and σ is (B,)."""


def consistency_coefficients(
    sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(c_skip^CM, c_out^CM)(σ): σd²/((σ−σmin)²+σd²) and σd·(σ−σmin)/√(σ²+σd²)."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted * shifted + sigma_data**2)
    c_out = sigma_data * shifted / (sigma * sigma + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_from_denoised(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """OSV eq. 4 given an already computed D(x, σ): f = c_skip^CM·x + c_out^CM·D."""
    c_skip, c_out = consistency_coefficients(sigma)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * denoised


def consistency_fn(denoise: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """f_θ(x, σ) for a denoiser D_θ (OSV eq. 4)."""
    return consistency_from_denoised(x, sigma, denoise(x, sigma))
