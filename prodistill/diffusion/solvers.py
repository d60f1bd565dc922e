"""The teacher's probability-flow ODE solvers, with classifier-free guidance.

For an EDM denoiser the PF-ODE is dx/dσ = (x − D(x, σ))/σ, so one Euler step from σ to σ' is
x' = x + (σ' − σ)·(x − D(x, σ))/σ — this is Φ in OSV eq. 8. Guidance is linear in D, so applying it to D
(as here) equals applying it to Φ (OSV's Φ̂) or to the v-prediction (the SVD pipeline).
"""

from __future__ import annotations

from typing import Callable, Protocol, TypeVar

import torch
from torch import Tensor

from prodistill.diffusion.consistency import Denoiser
from prodistill.diffusion.edm import append_dims


class Batchable(Protocol):
    def cat(self, other: "Batchable") -> "Batchable": ...


C = TypeVar("C", bound=Batchable)
ConditionalDenoiser = Callable[[Tensor, Tensor, C], Tensor]
"""D(x, σ, cond) -> x0 estimate."""


def frame_guidance(min_scale: float, max_scale: float, batch: int, frames: int, device=None) -> Tensor:
    """Per-frame guidance scales (B, F), linear from min to max over frames, as the SVD pipeline does."""
    return torch.linspace(min_scale, max_scale, frames, device=device).unsqueeze(0).expand(batch, frames)


def cfg_combine(d_uncond: Tensor, d_cond: Tensor, guidance: Tensor | float) -> Tensor:
    """D̂ = D(c_zero) + w·(D(c) − D(c_zero)) (OSV §4, CFG distillation); w is a float or (B, F)."""
    if isinstance(guidance, Tensor):
        guidance = append_dims(guidance.to(d_cond.dtype), d_cond.ndim)
    return d_uncond + guidance * (d_cond - d_uncond)


def bind(denoise: ConditionalDenoiser, cond) -> Denoiser:
    """D(x, σ) from D(x, σ, cond) with `cond` fixed."""
    return lambda x, sigma: denoise(x, sigma, cond)


def guided_denoiser(denoise: ConditionalDenoiser, cond: C, uncond: C, guidance: Tensor | float,
                    split: bool = False) -> Denoiser:
    """A Denoiser evaluating the unconditional and conditional branch as one batch of 2B and mixing them, or
    (`split`) as two calls of batch B: the same math, and under torch.compile the teacher then runs the batch-B
    graphs the other batch-B networks compiled already (see `prodistill.accel`, `--split-cfg`)."""
    both = uncond.cat(cond)

    def d(x: Tensor, sigma: Tensor) -> Tensor:
        if split:
            return cfg_combine(denoise(x, sigma, uncond), denoise(x, sigma, cond), guidance)
        out = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        d_uncond, d_cond = out.chunk(2)
        return cfg_combine(d_uncond, d_cond, guidance)

    return d


def euler_step(denoise: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One PF-ODE Euler step σ → σ' (per-sample σ of shape (B,)): x + (σ' − σ)·(x − D(x, σ))/σ."""
    d = denoise(x, sigma)
    return x + append_dims(sigma_next - sigma, x.ndim) * (x - d) / append_dims(sigma, x.ndim)


def teacher_solve(denoise: Denoiser, x: Tensor, sigmas_bm: Tensor) -> Tensor:
    """OSV eq. 8: m Euler steps of the (guided) teacher from σ_{n+m} down to σ_n.

    sigmas_bm is (B, m+1), each row descending σ_{n+m}, …, σ_n on the training grid. The loop length m is
    static, so the whole solve is a function of tensors only (compilable / CUDA-graph capturable).
    """
    for j in range(sigmas_bm.shape[1] - 1):
        x = euler_step(denoise, x, sigmas_bm[:, j], sigmas_bm[:, j + 1])
    return x


def edm_euler_sample(
    denoise: Denoiser, noise: Tensor, sigmas: Tensor, progress: Callable[[int], None] | None = None
) -> Tensor:
    """The teacher's sampler: Euler on the PF-ODE over `sigmas` (descending), ending at σ = 0.

    Starts from x = σ_0·noise; the final step to σ = 0 returns the denoiser's output, as diffusers'
    EulerDiscreteScheduler does for SVD.
    """
    sig = torch.cat([sigmas.to(noise.device, torch.float32), sigmas.new_zeros(1).to(noise.device, torch.float32)])
    x = noise * sig[0]
    ones = torch.ones(noise.shape[0], device=noise.device)
    for i in range(len(sig) - 1):
        x = euler_step(denoise, x, ones * sig[i], ones * sig[i + 1])
        if progress is not None:
            progress(i)
    return x
