"""LCM: plain latent consistency distillation, the baseline every video-distillation paper compares with.

The student (teacher + LoRA) at σ_{n+1} is pulled by a pseudo-Huber distance towards the EMA target θ⁻
applied where *one* Euler step of the guided teacher lands (σ_{n+1} → σ_n), with CFG distilled into the
student. No discriminator, no GAN pretraining, one training stage (it runs in OSV's stage-2 slot, so its
checkpoints live in RUN/stage2/ with "student" and "ema" groups).

OSV's stage 2 is this loss with an m-step teacher solve and an adversarial term added (OSV eq. 8-10); the
consistency pair both build on lives in `prodistill.methods.consistency`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prodistill.diffusion.consistency import ConsistencyParam
from prodistill.diffusion.edm import training_grid
from prodistill.diffusion.losses import pseudo_huber
from prodistill.diffusion.solvers import frame_guidance
from prodistill.methods.base import Method, StepOutput
from prodistill.methods.consistency import TeacherSolve, consistency_pair, huber_c, preview_student, solver_path
from prodistill.models.student import load_trainable, trainable_parameters
from prodistill.training.ema import EMA


class LCM(Method):
    """Latent consistency distillation: m = 1 guided-teacher Euler step, EMA target, pseudo-Huber, no GAN.

    `--solver-steps` is OSV's m and is ignored here: the single-step solver is what defines LCM.
    """

    name = "lcm"
    phases = ("generator",)
    solver_steps = 1

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        if stage != 2:
            raise ValueError(f"{self.name.upper()} is single-stage and runs as stage 2 (cfg.stages() == (2,)), "
                             f"got stage {stage}")
        self.cfg, self.models, self.stage, self.generator = cfg, models, stage, generator
        self.student = models.make_student(cfg, stage)
        self.trainable = trainable_parameters(self.student)
        self.ema = EMA(self.trainable, cfg.ema_decay)
        self.grid = training_grid(cfg.num_timesteps).to(models.device, torch.float32)
        self.student_d = models.denoiser(self.student)
        self.teacher_solve = TeacherSolve(models.denoiser(models.teacher))
        self.ema_d = self.ema.wrap(self.student_d)

    def parameters(self, phase: str) -> list[nn.Parameter]:
        return list(self.trainable.values())

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        x0, cond = self.models.prepare_batch(batch, self.cfg.fps, self.generator)
        eps = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        b, m = x0.shape[0], self.solver_steps
        n = torch.randint(0, self.cfg.num_timesteps - m, (b,), generator=self.generator, device=self.grid.device)
        guidance = frame_guidance(self.cfg.guidance_min, self.cfg.guidance_max, b, x0.shape[1], x0.device)
        target, prediction = consistency_pair(self.student_d, self.ema_d, self.teacher_solve, x0, eps, cond,
                                              solver_path(self.grid, n, m), guidance,
                                              ConsistencyParam.from_config(self.cfg))
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
