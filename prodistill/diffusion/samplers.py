"""Few-step samplers for a consistency student (no CFG at inference, OSV §4).

- `consistency_sample`: the multistep consistency sampler (Song et al.): denoise with f_θ, re-noise to the
  next σ, repeat; NFE = k.
- `time_travel_sample`: OSV's Time Travel Sampler (eq. 13); NFE = 2k. The paper uses it at k = 1 only
  (appendix C); it is defined for any k and implemented literally, with the same ε0 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prodistill.diffusion.consistency import SONG, ConsistencyParam, Denoiser, consistency_from_denoised
from prodistill.diffusion.edm import append_dims


def _full(x: Tensor, value: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def consistency_sample(
    denoise: Denoiser, noise: Tensor, sigmas: Tensor, generator: torch.Generator | None = None,
    stop: int | None = None, consistency: bool = True, param: ConsistencyParam = SONG,
) -> Tensor:
    """k-step consistency sampling over `sigmas` (descending, length k), starting at x = σ_0·noise.

    consistency=False: each step's clean estimate is the denoiser's output itself, not f_θ (a few-step
    generator such as AVDM2's, initialised as the teacher's denoiser). With `stop` = j < k, returns instead the
    noisy state at sigmas[j] that step j would denoise: the generator's own input at that step (backward
    simulation, as AVDM2 and DMD2 train few-step generators)."""
    x = noise * float(sigmas[0])
    x0 = x
    for j, s in enumerate(sigmas):
        if j == stop:
            return x
        sigma = _full(x, s)
        x0 = denoise(x, sigma)
        if consistency:
            x0 = consistency_from_denoised(x, sigma, x0, param)
        if j + 1 < len(sigmas):
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x0 + float(sigmas[j + 1]) * fresh
    return x0


def time_travel_sample(denoise: Denoiser, noise: Tensor, sigmas_k: Tensor, sigmas_k1: Tensor,
                       param: ConsistencyParam = SONG) -> Tensor:
    """OSV eq. 13. sigmas_k: the k-step schedule (descending); sigmas_k1: the (k+1)-step schedule.

    With t^k_0 = 0 and ascending indices, step i (from k−1 down to 0) goes from σ_a = t^k_{i+1} via the lower
    σ_b = t^{k+1}_{i+1} and back ("time travel") to t^k_i:
        f_a = f_θ(x, σ_a);  ε̂_a = (ε0 + (x − f_a)/σ_a)/2;  x_b = f_a + σ_b·ε̂_a
        f_b = f_θ(x_b, σ_b);  ε̂_b = (ε0 + (x_b − f_b)/σ_b)/2
        x̂ = c_skip(σ_a)·(f_b + σ_a·ε̂_b) + c_out(σ_a)·F_θ(x_b, σ_b) + σ(t^k_i)·ε0
    where F_θ is the network part of f (our D_θ).
    """
    k = len(sigmas_k)
    if len(sigmas_k1) != k + 1:
        raise ValueError(f"the (k+1)-step schedule must have {k + 1} entries, got {len(sigmas_k1)}")
    t_k = [0.0] + [float(s) for s in reversed(sigmas_k)]  # ascending, t_k[0] = 0
    t_k1 = [0.0] + [float(s) for s in reversed(sigmas_k1)]
    eps0 = noise
    x = noise * t_k[k]
    for i in range(k - 1, -1, -1):
        sa, sb = _full(x, t_k[i + 1]), _full(x, t_k1[i + 1])
        f_a = consistency_from_denoised(x, sa, denoise(x, sa), param)
        eps_a = (eps0 + (x - f_a) / t_k[i + 1]) / 2
        x_b = f_a + t_k1[i + 1] * eps_a
        d_b = denoise(x_b, sb)
        f_b = consistency_from_denoised(x_b, sb, d_b, param)
        eps_b = (eps0 + (x_b - f_b) / t_k1[i + 1]) / 2
        c_skip, c_out = param.coefficients(sa)
        x = (
            append_dims(c_skip, x.ndim) * (f_b + t_k[i + 1] * eps_b)
            + append_dims(c_out, x.ndim) * d_b
            + t_k[i] * eps0
        )
    return x
