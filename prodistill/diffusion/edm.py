"""EDM (Karras et al. 2022) preconditioning and σ schedules, as Stable Video Diffusion uses them.

SVD is an EDM model with v-prediction and σ_data = 1:
    x_σ = x0 + σ·ε,  c_in = 1/√(σ²+1),  c_skip = 1/(σ²+1),  c_out = −σ/√(σ²+1),  c_noise = ¼·ln σ,
    D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise).
"""

from __future__ import annotations

import torch
from torch import Tensor

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0


def preconditioning(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of the SVD/EDM v-prediction denoiser for σ of any shape."""
    s2p1 = sigma * sigma + 1.0
    return 1.0 / s2p1, -sigma / s2p1.sqrt(), 1.0 / s2p1.sqrt(), 0.25 * sigma.log()


def karras_sigmas(
    num: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """`num` Karras-spaced σ from sigma_max down to sigma_min (float64, descending, no trailing 0)."""
    if num < 1:
        raise ValueError(f"need at least one σ, got num={num}")
    if num == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def training_grid(num_timesteps: int = 100, **kw) -> Tensor:
    """The N discrete training noise levels σ_0 = σ_min < … < σ_{N−1} = σ_max (ascending, float64).

    OSV §5: "we uniformly sample 100 timesteps for training" — uniform over the index n of this grid.
    """
    return karras_sigmas(num_timesteps, **kw).flip(0)


def ddpm_sigmas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """σ = √((1 − ᾱ_t)/ᾱ_t) of Stable Diffusion's DDPM schedule (scaled-linear β), t = 0 … T−1, ascending
    (float64): the noise levels of a VP model's timestep t in EDM's x0 + σ·ε form. SVD's latents share SD's
    latent space and scaling, so a paper's "t ∈ [a·T, b·T]" for an SD-based teacher means these σ here."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sampler_indices(num_steps: int, num_timesteps: int) -> list[int]:
    """Grid indices (descending, first = N−1) that a `num_steps` consistency sampler visits."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {num_steps}")
    top = num_timesteps - 1
    return [top - (j * top) // num_steps for j in range(num_steps)]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Right-pad v's shape with singleton dims up to `ndim` (per-sample scalars → broadcastable)."""
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))
