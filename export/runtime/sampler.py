"""The student's samplers in numpy, twins of `prodistill.diffusion.samplers`: the consistency student's 1 step
and TTS, and a few-step generator's k steps.

The exported denoiser graph is D(x, σ) (EDM-preconditioned, SVD v-prediction); the consistency
parameterisation (OSV eq. 4) is applied here, because TTS needs D itself, not only f:
    f(x, σ) = c_skip^CM(σ)·x + c_out^CM(σ)·D(x, σ),
    c_skip^CM = σd²/((s(σ−σmin))²+σd²),  c_out^CM = σd·s(σ−σmin)/√((sσ)²+σd²),
with the σ_data σd and timestep scaling s the student was trained with (the manifest's cm_*; 1 and 1 by default).
Arithmetic is float32 like the torch samplers (the σ scalars are python floats there and here).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
"""D(x, σ) for latents x (1, F, 4, h, w) float32 and one σ."""


Param = tuple[float, float]
"""(σ_data, timestep scaling s) of the consistency coefficients."""


def consistency_coefficients(sigma: float, sigma_min: float, param: Param = (1.0, 1.0)
                             ) -> tuple[np.float32, np.float32]:
    """(c_skip^CM, c_out^CM)(σ), evaluated in float32 as the torch twin does."""
    sd, scale = np.float32(param[0]), np.float32(param[1])
    s = np.float32(sigma)
    shifted = (s - np.float32(sigma_min)) * scale
    scaled = s * scale
    return sd * sd / (shifted * shifted + sd * sd), sd * shifted / np.sqrt(scaled * scaled + sd * sd)


def consistency(x: np.ndarray, sigma: float, denoised: np.ndarray, sigma_min: float,
                param: Param = (1.0, 1.0)) -> np.ndarray:
    """f = c_skip^CM·x + c_out^CM·D (OSV eq. 4)."""
    c_skip, c_out = consistency_coefficients(sigma, sigma_min, param)
    return c_skip * x + c_out * denoised


def one_step(denoise: Denoise, noise: np.ndarray, sigma: float, sigma_min: float,
             param: Param = (1.0, 1.0)) -> np.ndarray:
    """The 1-step consistency sampler: x = σ·ε, return f(x, σ) (NFE 1)."""
    x = noise * np.float32(sigma)
    return consistency(x, sigma, denoise(x, sigma), sigma_min, param)


def time_travel(denoise: Denoise, noise: np.ndarray, sigma_a: float, sigma_b: float,
                sigma_min: float, param: Param = (1.0, 1.0)) -> np.ndarray:
    """OSV eq. 13 at one step (NFE 2): from σ_a down to σ_b and back ("time travel") to t_0 = 0, with ε0 = noise:
        f_a = f(x, σ_a);  ε̂_a = (ε0 + (x − f_a)/σ_a)/2;  x_b = f_a + σ_b·ε̂_a
        f_b = f(x_b, σ_b);  ε̂_b = (ε0 + (x_b − f_b)/σ_b)/2
        x̂ = c_skip^CM(σ_a)·(f_b + σ_a·ε̂_b) + c_out^CM(σ_a)·D(x_b, σ_b)   (+ t_0·ε0 = 0)
    """
    sa, sb = np.float32(sigma_a), np.float32(sigma_b)
    x = noise * sa
    f_a = consistency(x, sigma_a, denoise(x, sigma_a), sigma_min, param)
    eps_a = (noise + (x - f_a) / sa) / 2
    x_b = f_a + sb * eps_a
    d_b = denoise(x_b, sigma_b)
    f_b = consistency(x_b, sigma_b, d_b, sigma_min, param)
    eps_b = (noise + (x_b - f_b) / sb) / 2
    c_skip, c_out = consistency_coefficients(sigma_a, sigma_min, param)
    return c_skip * (f_b + sa * eps_b) + c_out * d_b


def generator_sample(denoise: Denoise, noise: np.ndarray, fresh: list[np.ndarray], sigmas: list[float]) -> np.ndarray:
    """A few-step generator (AVDM2) over `sigmas` (descending, length k), the twin of `consistency_sample(...,
    consistency=False)`: x = σ_0·ε; at each step the clean estimate is D(x, σ_j) itself, and the next input is
    x = D + σ_{j+1}·ε_{j+1} with a fresh draw `fresh[j]` (k − 1 of them; NFE k)."""
    if len(fresh) != len(sigmas) - 1:
        raise ValueError(f"a {len(sigmas)}-step generator needs {len(sigmas) - 1} fresh noise draws, got {len(fresh)}")
    x = noise * np.float32(sigmas[0])
    x0 = x
    for j, sigma in enumerate(sigmas):
        x0 = denoise(x, sigma)
        if j + 1 < len(sigmas):
            x = x0 + np.float32(sigmas[j + 1]) * fresh[j]
    return x0
