"""OSV (One Step Video generation), both training stages, on the latent DINOv2 discriminator.

Stage 1, Latent GAN Pretraining (LGP): the student (teacher + LoRA) denoises real latents noised to a grid
level σ_n in one consistency step; a hinge GAN on latents against the real x0 plus a pseudo-Huber pull
towards x0 (eq. 6-7). Stage 2, Adversarial Consistency latent Distillation (ACD): the frozen teacher solves
m Euler steps of the guided PF-ODE from σ_{n+m} to σ_n (eq. 8), the EMA target θ⁻ maps that point to x0,
and the student at σ_{n+m} is pulled towards it by pseudo-Huber and by the discriminator, which now treats
the target's output as real (eq. 9-10).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prodistill.diffusion.consistency import ConsistencyParam, consistency_from_denoised
from prodistill.diffusion.edm import training_grid
from prodistill.diffusion.losses import hinge_d_loss, hinge_g_loss, pseudo_huber
from prodistill.diffusion.solvers import frame_guidance
from prodistill.methods.base import Method, StepOutput
from prodistill.methods.consistency import TeacherSolve, consistency_pair, huber_c, preview_student, solver_path
from prodistill.models.discriminator import build_discriminator
from prodistill.models.student import load_trainable, trainable_parameters
from prodistill.training.ema import EMA


class OSV(Method):
    name = "osv"
    phases = ("generator", "discriminator")

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        if stage not in (1, 2):
            raise ValueError(f"OSV has stages 1 and 2, got {stage}")
        self.cfg, self.models, self.stage, self.generator = cfg, models, stage, generator
        device = models.device
        self.student = models.make_student(cfg, stage)
        self.trainable = trainable_parameters(self.student)
        self.disc = build_discriminator(cfg, models)
        self.grid = training_grid(cfg.num_timesteps).to(device, torch.float32)
        self.ema = EMA(self.trainable, cfg.ema_decay) if stage == 2 else None
        self.student_d = models.denoiser(self.student)
        self.teacher_solve = TeacherSolve(models.denoiser(models.teacher))
        self.ema_d = self.ema.wrap(self.student_d) if self.ema else None

    # -- helpers ------------------------------------------------------------------------------------------
    def _randint(self, high: int, batch: int) -> Tensor:
        return torch.randint(0, high, (batch,), generator=self.generator, device=self.grid.device)

    def _randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def disc_logits(self, latents: Tensor) -> Tensor:
        """The discriminator's logits of latents (B, F, C, h, w), or of their decoded frames (`--disc-input`)."""
        frames = self.models.decode_with_grad(latents) if self.cfg.disc_input == "decoded" else latents
        with self.models.autocast():
            return self.disc(frames).float()

    # -- Method -------------------------------------------------------------------------------------------
    def parameters(self, phase: str) -> list[nn.Parameter]:
        return list(self.trainable.values()) if phase == "generator" else self.disc.trainable_parameters()

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        return self._generator(batch) if phase == "generator" else self._discriminator(cache)

    def _generator(self, batch: dict) -> StepOutput:
        x0, cond = self.models.prepare_batch(batch, self.cfg.fps, self.generator)
        eps = self._randn(x0)
        b = x0.shape[0]
        if self.stage == 1:
            n = self._randint(self.cfg.num_timesteps, b)
            sigma = self.grid[n]
            x_t = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
            fake = consistency_from_denoised(x_t, sigma, self.student_d(x_t, sigma, cond),
                                             ConsistencyParam.from_config(self.cfg))  # f_θ(x_tn, t_n)
            real, lam = x0, self.cfg.lambda_lgp  # eq. 6-7: the real latents are the GAN's real and d's target
        else:
            m = self.cfg.solver_steps
            n = self._randint(self.cfg.num_timesteps - m, b)
            guidance = frame_guidance(self.cfg.guidance_min, self.cfg.guidance_max, b, x0.shape[1], x0.device)
            real, fake = consistency_pair(self.student_d, self.ema_d, self.teacher_solve, x0, eps, cond,
                                          solver_path(self.grid, n, m), guidance,
                                          ConsistencyParam.from_config(self.cfg))  # eq. 8, m teacher steps
            lam = self.cfg.lambda_acd  # eq. 9-10: the EMA target's output is the GAN's real
        g_adv = hinge_g_loss(self.disc_logits(fake))
        distance = pseudo_huber(real, fake, huber_c(self.cfg, x0)).mean()  # λ(t_n) = 1
        loss = lam * g_adv + distance  # eq. 7 (stage 1) / eq. 10 (stage 2)
        logs = {"loss/g_adv": g_adv.detach(), "loss/distance": distance.detach(), "loss/g_total": loss.detach()}
        return StepOutput(loss, logs, {"real": real.detach(), "fake": fake.detach()})

    def _discriminator(self, cache: dict[str, Tensor]) -> StepOutput:
        real_logits = self.disc_logits(cache["real"])
        fake_logits = self.disc_logits(cache["fake"])
        loss = hinge_d_loss(real_logits, fake_logits)  # eq. 6 / eq. 9
        logs = {"loss/d": loss.detach(), "d/logits_real": real_logits.detach().mean(),
                "d/logits_fake": fake_logits.detach().mean()}
        return StepOutput(loss, logs)

    def after_optimizer_step(self, phase: str) -> None:
        if phase == "generator" and self.ema is not None:
            self.ema.update()

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.disc.train(mode)

    # -- weights ------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, dict[str, Tensor]]:
        out = {"student": dict(self.trainable), "discriminator": self.disc.trainable_state_dict()}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        return out

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        """Load a checkpoint of this stage, or stage 1's weights into a fresh stage 2: the EMA target then
        starts from the loaded student (OSV §4), and modules trained only in stage 2 keep the teacher's values."""
        student = weights["student"]
        if self.stage == 2 and "ema" not in weights:
            student = {**{k: p.detach() for k, p in self.trainable.items()}, **student}
        load_trainable(self.student, student)
        self.disc.load_trainable_state_dict(weights["discriminator"])
        if self.ema is not None:
            self.ema.load_state_dict(weights.get("ema") or self.trainable)

    def preview(self, batch: dict, generator: torch.Generator) -> Tensor:
        return preview_student(self.cfg, self.models, self.student_d, batch, generator)

