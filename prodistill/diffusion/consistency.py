"""The consistency parameterisation (OSV eq. 4) on top of an EDM denoiser.

    f_θ(x, σ) = c_skip^CM(σ)·x + c_out^CM(σ)·D_θ(x, σ)

with the coefficients of Song et al. (consistency models), shifted so that the boundary condition holds
exactly at σ_min: c_skip^CM(σ_min) = 1, c_out^CM(σ_min) = 0, i.e. f(x, σ_min) = x. σ_data = 1 for SVD.

Timestep scaling (LCM's form, `--cm-scale s`): σ − σ_min and σ are multiplied by s inside both coefficients,

    c_skip^CM = σd² / ((s(σ−σmin))² + σd²),   c_out^CM = σd·s(σ−σmin) / √((sσ)² + σd²),

so that c_skip decays s times faster away from the boundary (which stays exact) and the student's own output
dominates at the few-step samplers' σ; s = 1 is the form above. LCM's code scales its discrete timestep by 10,
MCM's by 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from prodistill.diffusion.edm import SIGMA_MIN, append_dims

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""D(x, σ) -> x0 estimate; x is (B, ...) and σ is (B,)."""


def consistency_coefficients(
    sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = 1.0, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(c_skip^CM, c_out^CM)(σ): σd²/((s(σ−σmin))²+σd²) and σd·s(σ−σmin)/√((sσ)²+σd²) (s = `scale`)."""
    shifted = (sigma - sigma_min) * scale
    scaled = sigma * scale
    c_skip = sigma_data**2 / (shifted * shifted + sigma_data**2)
    c_out = sigma_data * shifted / (scaled * scaled + sigma_data**2).sqrt()
    return c_skip, c_out


@dataclass(frozen=True)
class ConsistencyParam:
    """σ_data and the timestep scaling s of the consistency coefficients (`--cm-sigma-data`, `--cm-scale`)."""

    sigma_data: float = 1.0
    scale: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "ConsistencyParam":
        return cls(float(getattr(cfg, "cm_sigma_data", 1.0)), float(getattr(cfg, "cm_scale", 1.0)))

    def coefficients(self, sigma: Tensor, sigma_min: float = SIGMA_MIN) -> tuple[Tensor, Tensor]:
        return consistency_coefficients(sigma, sigma_min, self.sigma_data, self.scale)


SONG = ConsistencyParam()
"""σ_data = 1, no timestep scaling: the coefficients prodistill used before `--cm-scale` existed."""


def consistency_from_denoised(x: Tensor, sigma: Tensor, denoised: Tensor, param: ConsistencyParam = SONG) -> Tensor:
    """OSV eq. 4 given an already computed D(x, σ): f = c_skip^CM·x + c_out^CM·D."""
    c_skip, c_out = param.coefficients(sigma)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * denoised


def consistency_fn(denoise: Denoiser, x: Tensor, sigma: Tensor, param: ConsistencyParam = SONG) -> Tensor:
    """f_θ(x, σ) for a denoiser D_θ (OSV eq. 4)."""
    return consistency_from_denoised(x, sigma, denoise(x, sigma), param)
