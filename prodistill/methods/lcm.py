"""LCM: plain latent consistency distillation, the baseline every video-distillation paper compares with.

The student (teacher + LoRA) at σ_{n+1} is pulled by a pseudo-Huber distance towards the EMA target θ⁻
applied where *one* Euler step of the guided teacher lands (σ_{n+1} → σ_n), with CFG distilled into the
student. No discriminator, no GAN pretraining, one training stage (it runs in OSV's stage-2 slot, so its
checkpoints live in RUN/stage2/ with "student" and "ema" groups).

OSV's stage 2 is this loss with an m-step teacher solve and an adversarial term added (OSV eq. 8-10), so the
consistency pair — `solver_path` and `consistency_pair` — lives here and `prodistill.methods.osv` reuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prodistill.diffusion.consistency import consistency_from_denoised
from prodistill.diffusion.edm import training_grid
from prodistill.diffusion.losses import default_huber_c, pseudo_huber
from prodistill.diffusion.solvers import ConditionalDenoiser, bind, frame_guidance, guided_denoiser, teacher_solve
from prodistill.methods.base import Method, StepOutput
from prodistill.models.student import load_trainable, trainable_parameters
from prodistill.sampling import sample_student
from prodistill.training.ema import EMA


# -- shared with OSV ----------------------------------------------------------------------------------------
def solver_path(grid: Tensor, n: Tensor, m: int) -> Tensor:
    """(B, m+1) descending σ_{n+m}, …, σ_n on the ascending training `grid` for start indices n (B,)."""
    return grid[n[:, None] + torch.arange(m, -1, -1, device=n.device)]


def consistency_pair(student_d: ConditionalDenoiser, ema_d: ConditionalDenoiser, teacher_d: ConditionalDenoiser,
                     x0: Tensor, eps: Tensor, cond, path_bm: Tensor, guidance: Tensor | float
                     ) -> tuple[Tensor, Tensor]:
    """The consistency-distillation pair (target, prediction) for clean latents x0 (B, F, C, h, w).

    x_{t_{n+m}} = x0 + σ_{n+m}·ε; the guided teacher solves the PF-ODE along `path_bm` (OSV eq. 8, with CFG
    distillation Φ̂ = Φ(c_zero) + w·(Φ(c) − Φ(c_zero))); target = f_θ⁻(x^φ_tn, t_n), without gradient;
    prediction = f_θ(x_{t_{n+m}}, t_{n+m}) (OSV eq. 10; LCM is m = 1).
    """
    sigma_start, sigma_end = path_bm[:, 0], path_bm[:, -1]
    x_start = x0 + sigma_start.view(-1, *([1] * (x0.ndim - 1))) * eps
    with torch.no_grad():
        teacher = guided_denoiser(teacher_d, cond, cond.unconditional(), guidance)
        x_phi = teacher_solve(teacher, x_start, path_bm)  # OSV eq. 8
        target = consistency_from_denoised(x_phi, sigma_end, ema_d(x_phi, sigma_end, cond))
    prediction = consistency_from_denoised(x_start, sigma_start, student_d(x_start, sigma_start, cond))
    return target, prediction


def huber_c(cfg, x0: Tensor) -> float:
    """c of the pseudo-Huber distance: `cfg.huber_c`, or iCT's 0.00054·√d for one sample of x0."""
    return cfg.huber_c if cfg.huber_c is not None else default_huber_c(x0[0].numel())


@torch.no_grad()
def preview_student(cfg, models, student_d: ConditionalDenoiser, batch: dict, generator: torch.Generator) -> Tensor:
    """A 1-step student generation (pixels) conditioned on `batch`, drawing only from `generator`."""
    x0, cond = models.prepare_batch(batch, cfg.fps, generator)
    latents = sample_student(bind(student_d, cond), tuple(x0.shape), 1, False, cfg.num_timesteps, generator,
                             models.device)
    return models.decode(latents)


# -- the method ---------------------------------------------------------------------------------------------
class LCM(Method):
    """Latent consistency distillation: m = 1 guided-teacher Euler step, EMA target, pseudo-Huber, no GAN.

    `--solver-steps` is OSV's m and is ignored here: the single-step solver is what defines LCM.
    """

    name = "lcm"
    phases = ("generator",)
    solver_steps = 1

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        if stage != 2:
            raise ValueError(f"LCM is single-stage and runs as stage 2 (cfg.stages() == (2,)), got stage {stage}")
        self.cfg, self.models, self.stage, self.generator = cfg, models, stage, generator
        self.student = models.make_student(cfg, stage)
        self.trainable = trainable_parameters(self.student)
        self.ema = EMA(self.trainable, cfg.ema_decay)
        self.grid = training_grid(cfg.num_timesteps).to(models.device, torch.float32)
        self.student_d = models.denoiser(self.student)
        self.teacher_d = models.denoiser(models.teacher)
        self.ema_d = models.denoiser(self.student, self.ema.params)

    def parameters(self, phase: str) -> list[nn.Parameter]:
        return list(self.trainable.values())

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        x0, cond = self.models.prepare_batch(batch, self.cfg.fps, self.generator)
        eps = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        b, m = x0.shape[0], self.solver_steps
        n = torch.randint(0, self.cfg.num_timesteps - m, (b,), generator=self.generator, device=self.grid.device)
        guidance = frame_guidance(self.cfg.guidance_min, self.cfg.guidance_max, b, x0.shape[1], x0.device)
        target, prediction = consistency_pair(self.student_d, self.ema_d, self.teacher_d, x0, eps, cond,
                                              solver_path(self.grid, n, m), guidance)
        loss = pseudo_huber(target, prediction, huber_c(self.cfg, x0)).mean()  # λ(t_n) = 1
        return StepOutput(loss, {"loss/distance": loss.detach(), "loss/g_total": loss.detach()})

    def after_optimizer_step(self, phase: str) -> None:
        self.ema.update()

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {"student": dict(self.trainable), "ema": self.ema.state_dict()}

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        """Load an LCM checkpoint; a checkpoint without "ema" starts the target from the loaded student."""
        load_trainable(self.student, weights["student"])
        self.ema.load_state_dict(weights.get("ema") or self.trainable)

    def preview(self, batch: dict, generator: torch.Generator) -> Tensor:
        return preview_student(self.cfg, self.models, self.student_d, batch, generator)
