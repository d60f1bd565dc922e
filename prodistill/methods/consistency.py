"""Consistency-distillation pieces shared by the methods: the teacher's guided m-step solve, the (target,
prediction) pair of OSV eq. 8-10 (LCM is its m = 1 case), the σ path on the training grid, the pseudo-Huber c,
and the 1-step preview."""

from __future__ import annotations

import torch
from torch import Tensor

from prodistill.diffusion.consistency import SONG, ConsistencyParam, consistency_from_denoised
from prodistill.diffusion.losses import default_huber_c
from prodistill.diffusion.solvers import ConditionalDenoiser, bind, guided_denoiser, teacher_solve
from prodistill.sampling import sample_student


def solver_path(grid: Tensor, n: Tensor, m: int) -> Tensor:
    """(B, m+1) descending σ_{n+m}, …, σ_n on the ascending training `grid` for start indices n (B,)."""
    return grid[n[:, None] + torch.arange(m, -1, -1, device=n.device)]


class TeacherSolve:
    """OSV eq. 8 as one call on tensors: x_{t_{n+m}} (B, F, C, h, w) → x^φ_{t_n} by m Euler steps of the frozen
    teacher's guided PF-ODE along `path_bm` (B, m+1), with CFG distillation Φ̂ = Φ(c_zero) + w·(Φ(c) − Φ(c_zero))
    and per-frame scales `guidance` (B, F).

    This is the seam the speed-ups use: `prodistill.accel` replaces a method's `teacher_solve` by a CUDA-graph
    replay of this very call (same signature, same result), so the method's math never changes with them.
    """

    def __init__(self, teacher_d: ConditionalDenoiser, split_cfg: bool = False):
        self.teacher_d, self.split_cfg = teacher_d, split_cfg

    @torch.no_grad()
    def __call__(self, x_start: Tensor, path_bm: Tensor, cond, guidance: Tensor) -> Tensor:
        teacher = guided_denoiser(self.teacher_d, cond, cond.unconditional(), guidance, split=self.split_cfg)
        return teacher_solve(teacher, x_start, path_bm)


def consistency_pair(student_d: ConditionalDenoiser, ema_d: ConditionalDenoiser, solve: TeacherSolve,
                     x0: Tensor, eps: Tensor, cond, path_bm: Tensor, guidance: Tensor,
                     param: ConsistencyParam = SONG) -> tuple[Tensor, Tensor]:
    """The consistency-distillation pair (target, prediction) for clean latents x0 (B, F, C, h, w).

    x_{t_{n+m}} = x0 + σ_{n+m}·ε; `solve` runs the guided teacher along `path_bm` (OSV eq. 8); target =
    f_θ⁻(x^φ_tn, t_n), without gradient; prediction = f_θ(x_{t_{n+m}}, t_{n+m}) (OSV eq. 10; LCM is m = 1).
    """
    sigma_start, sigma_end = path_bm[:, 0], path_bm[:, -1]
    x_start = x0 + sigma_start.view(-1, *([1] * (x0.ndim - 1))) * eps
    with torch.no_grad():
        x_phi = solve(x_start, path_bm, cond, guidance)  # OSV eq. 8
        target = consistency_from_denoised(x_phi, sigma_end, ema_d(x_phi, sigma_end, cond), param)
    prediction = consistency_from_denoised(x_start, sigma_start, student_d(x_start, sigma_start, cond), param)
    return target, prediction


def huber_c(cfg, x0: Tensor) -> float:
    """c of the pseudo-Huber distance: `cfg.huber_c`, or iCT's 0.00054·√d for one sample of x0."""
    return cfg.huber_c if cfg.huber_c is not None else default_huber_c(x0[0].numel())


@torch.no_grad()
def preview_student(cfg, models, student_d: ConditionalDenoiser, batch: dict, generator: torch.Generator,
                    steps: int = 1, consistency: bool = True) -> Tensor:
    """A `steps`-step student generation (pixels) conditioned on `batch`, drawing only from `generator`."""
    x0, cond = models.prepare_batch(batch, cfg.fps, generator)
    latents = sample_student(bind(student_d, cond), tuple(x0.shape), steps, False, cfg.num_timesteps, generator,
                             models.device, consistency=consistency, param=ConsistencyParam.from_config(cfg))
    return models.decode(latents)
