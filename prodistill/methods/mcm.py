"""MCM (Motion Consistency Model): LCM whose consistency loss compares only a motion representation, plus a
frame-sparse image discriminator for appearance, plus mixed trajectory distillation.

Generator phase, on one batch (MCM §3):
1. Mixed trajectories (eq. 7-9): with probability 1 − λ_real the clean latents x0 are replaced by the
   student's own 1-step sample f_θ(σ_max·z, σ_max) from pure noise, without gradient, before the usual
   noising; so in expectation the loss is eq. 9's λ_real·(real-trajectory terms) + (1 − λ_real)·(generated).
2. Motion consistency distillation (eq. 6 / 8): LCM's pair — one guided-teacher Euler step σ_{n+1} → σ_n,
   EMA target θ⁻ — compared through M(·) (`prodistill.methods.motion`) with the pseudo-Huber distance; for
   the learned M the prediction goes through the motion head and the target through the head's EMA copy.
3. Adversarial term (eq. 4): −D on l random frames of the prediction, D judging each frame as an image;
   loss = L_MCD + λ_adv·L_adv^G.

Discriminator phase (eq. 5): those l predicted frames (detached) are fake; real are l random frames of the
batch's real clip, or images of `--image-data`. Hinge loss as the paper, or the authors' scripts' floored
WGAN loss, plus their small gradient penalty on the DINOv2 features. D is the package's latent DINOv2
discriminator (frozen backbone, trainable upsampler and spatial heads, no temporal heads); `--disc-input
decoded` decodes every judged frame on its own with the VAE instead, as the paper's pixel discriminator.

The motion head shares the student's optimiser and lives in its own checkpoint groups ("motion_head",
"motion_head_ema"): sampling and export read only "student" / "ema", so the head never reaches inference.
The paper's text conditioning of the discriminator (CLIP text embeddings) has no counterpart here: SVD is
conditioned on an image, and the discriminator is unconditional.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prodistill.data.images import ImageFolder, list_images
from prodistill.diffusion.consistency import ConsistencyParam
from prodistill.diffusion.losses import clipped_wgan_d_loss, critic_g_loss, hinge_d_loss, pseudo_huber
from prodistill.diffusion.solvers import bind, frame_guidance
from prodistill.methods.base import StepOutput
from prodistill.methods.consistency import consistency_pair, huber_c, solver_path
from prodistill.methods.lcm import LCM
from prodistill.methods.motion import MOTION_REPRESENTATIONS, MotionHead
from prodistill.models.discriminator import DiscriminatorHeads, build_discriminator
from prodistill.models.student import load_trainable
from prodistill.sampling import sample_student
from prodistill.training.ema import EMA


class MCM(LCM):
    """LCM's student, EMA target and single-step guided teacher, with MCM's motion loss, frame discriminator
    and mixed trajectories. Single-stage (stage 2), phases generator then discriminator."""

    name = "mcm"
    phases = ("generator", "discriminator")

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.parallel == "fsdp" and 0 < cfg.lambda_real < 1:
            raise ValueError("--method mcm with 0 < --lambda-real < 1 does not support --parallel fsdp yet: each "
                             "rank draws on its own whether the trajectory starts from the student's sample, so "
                             "the ranks would run different numbers of sharded forwards and hang; use --parallel "
                             "ddp, or --lambda-real 0 or 1")
        if cfg.image_data is not None:
            list_images(cfg.image_data)

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        super().__init__(cfg, models, stage, generator)
        self.represent = MOTION_REPRESENTATIONS[cfg.motion_repr]
        self.head = self.head_ema = self.head_target = None
        if cfg.motion_repr == "learned":
            self.head = MotionHead(models.latent_channels).to(models.device)
            self.head_ema = EMA(dict(self.head.named_parameters()), cfg.ema_decay)
            self.head_target = self.head_ema.wrap(self.head)
        self.disc = build_discriminator(cfg, models, temporal_heads=False)
        self.images = ImageFolder(cfg.image_data) if cfg.image_data is not None else None

    # -- helpers ------------------------------------------------------------------------------------------
    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.generator.device)

    def _pick_frames(self, video: Tensor) -> Tensor:
        """l distinct random frames of each clip (B, F, ...) → (B, l, ...) (MCM §3.1's sparse sampling)."""
        b, f = video.shape[:2]
        idx = self._rand(b, f).argsort(dim=1)[:, : self.cfg.disc_frames].to(video.device)
        return video[torch.arange(b, device=video.device)[:, None], idx]

    def _decode_frames(self, latents: Tensor) -> Tensor:
        """Latent frames (B, l, C, h, w) → pixels (B, l, 3, H, W), each frame decoded on its own (differentiable)."""
        b, l = latents.shape[:2]
        return self.models.decode_with_grad(latents.flatten(0, 1).unsqueeze(1)).squeeze(1).unflatten(0, (b, l))

    def _fake_input(self, fake_latents: Tensor) -> Tensor:
        return self._decode_frames(fake_latents) if self.cfg.disc_input == "decoded" else fake_latents

    @torch.no_grad()
    def real_frames(self, x0: Tensor) -> Tensor:
        """The discriminator's real frames (B, l, ...), in its input space: l random frames of each real clip,
        or B·l random images of `--image-data` (VAE-encoded unless the discriminator reads decoded frames)."""
        if self.images is None:
            frames = self._pick_frames(x0)
            return self._decode_frames(frames) if self.cfg.disc_input == "decoded" else frames
        b, l = x0.shape[0], self.cfg.disc_frames
        idx = torch.randint(len(self.images), (b * l,), generator=self.generator, device=self.generator.device)
        width, height = self.models.pixel_size(x0)  # the batch's: --resolution-schedule may have switched
        pixels = self.images.load(idx.tolist(), width, height).to(x0.device).unflatten(0, (b, l))
        return pixels if self.cfg.disc_input == "decoded" else self.models.encode_video(pixels, self.generator)

    def trajectory_start(self, x0: Tensor, cond) -> tuple[Tensor, bool]:
        """MCM eq. 7: the clean latents the trajectory starts from, and whether they are the student's own
        1-step sample (drawn with probability 1 − λ_real from the method's generator; one host sync)."""
        lam = self.cfg.lambda_real
        if lam >= 1 or (lam > 0 and self._rand().item() < lam):
            return x0, False
        sample = sample_student(bind(self.student_d, cond), tuple(x0.shape), 1, False, self.cfg.num_timesteps,
                                self.generator, x0.device, param=ConsistencyParam.from_config(self.cfg))
        return sample.to(x0.dtype), True

    def motion(self, latents: Tensor, target: bool = False) -> Tensor:
        """M(·) of `--motion-repr` for latents (B, F, C, h, w); `target` uses the motion head's EMA copy."""
        m = self.represent(latents)
        if self.head is None:
            return m
        return self.head_target(m) if target else self.head(m)

    def disc_logits(self, frames: Tensor) -> Tensor:
        with self.models.autocast():
            return self.disc(frames).float()

    # -- Method -------------------------------------------------------------------------------------------
    def parameters(self, phase: str) -> list[nn.Parameter]:
        if phase == "discriminator":
            return self.disc.trainable_parameters()
        return list(self.trainable.values()) + (list(self.head.parameters()) if self.head is not None else [])

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        return self._generator(batch) if phase == "generator" else self._discriminator(cache)

    def _generator(self, batch: dict) -> StepOutput:
        cfg = self.cfg
        x0, cond = self.models.prepare_batch(batch, cfg.fps, self.generator)
        real = self.real_frames(x0)
        start, generated = self.trajectory_start(x0, cond)
        eps = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        b = x0.shape[0]
        n = torch.randint(0, cfg.num_timesteps - 1, (b,), generator=self.generator, device=self.grid.device)
        guidance = frame_guidance(cfg.guidance_min, cfg.guidance_max, b, x0.shape[1], x0.device)
        target, prediction = consistency_pair(self.student_d, self.ema_d, self.teacher_solve, start, eps, cond,
                                              solver_path(self.grid, n, 1), guidance,
                                              ConsistencyParam.from_config(self.cfg))
        with torch.no_grad():
            target_m = self.motion(target, target=True)
        prediction_m = self.motion(prediction)
        distance = pseudo_huber(target_m, prediction_m, huber_c(cfg, prediction_m)).mean()  # eq. 6 (eq. 8)
        fake = self._pick_frames(prediction)
        g_adv = critic_g_loss(self.disc_logits(self._fake_input(fake)))  # eq. 4
        loss = distance + cfg.lambda_adv * g_adv  # eq. 9, its real or generated half as drawn in eq. 7
        logs = {"loss/distance": distance.detach(), "loss/g_adv": g_adv.detach(), "loss/g_total": loss.detach(),
                "mcm/generated_trajectory": float(generated)}
        return StepOutput(loss, logs, {"real": real, "fake": fake.detach()})

    def _discriminator(self, cache: dict[str, Tensor]) -> StepOutput:
        real = cache["real"]
        with torch.no_grad():
            fake = self._fake_input(cache["fake"])
        real_logits, fake_logits = self.disc_logits(real), self.disc_logits(fake)
        if self.cfg.disc_loss == "hinge":
            loss = hinge_d_loss(real_logits, fake_logits)  # eq. 5
        else:
            loss = clipped_wgan_d_loss(real_logits, fake_logits)
        logs = {"d/logits_real": real_logits.detach().mean(), "d/logits_fake": fake_logits.detach().mean()}
        if self.cfg.disc_gp > 0:
            penalty = self.gradient_penalty(real, fake)
            loss = loss + self.cfg.disc_gp * penalty
            logs["loss/d_gp"] = penalty.detach()
        logs["loss/d"] = loss.detach()
        return StepOutput(loss, logs)

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        """(‖∇_φ D‖₂ − 1)² per judged frame, averaged, where φ are the backbone features (all selected layers
        together) of a random interpolate α·real + (1 − α)·fake: the penalty of the authors' scripts (WGAN-GP,
        taken at the frozen DINOv2's output, so no second-order gradient runs through the backbone)."""
        b, l = real.shape[:2]
        alpha = torch.rand((b, l, 1, 1, 1), generator=self.generator, device=self.generator.device)
        alpha = alpha.to(real.device, real.dtype)
        with torch.no_grad(), self.models.autocast():
            features = self.disc.video_features(alpha * real + (1 - alpha) * fake)
        features = [f.detach().float().requires_grad_(True) for f in features]
        # the heads' class forward: a compiled region (`--compile on`) has no double backward
        logits = DiscriminatorHeads.forward(self.disc.heads, features, b, l)
        grads = torch.autograd.grad(logits.sum(), features, create_graph=True)
        norms = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
        return (norms - 1).pow(2).mean()

    def after_optimizer_step(self, phase: str) -> None:
        if phase == "generator":
            self.ema.update()
            if self.head_ema is not None:
                self.head_ema.update()

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.disc.train(mode)
        if self.head is not None:
            self.head.train(mode)

    # -- weights ------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, dict[str, Tensor]]:
        out = {**super().weights(), "discriminator": self.disc.trainable_state_dict()}
        if self.head is not None:
            out["motion_head"] = dict(self.head.named_parameters())
            out["motion_head_ema"] = self.head_ema.state_dict()
        return out

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        """Load an MCM checkpoint of the same `--motion-repr`."""
        super().load_weights(weights)
        self.disc.load_trainable_state_dict(weights["discriminator"])
        if self.head is not None:
            if "motion_head" not in weights:
                raise ValueError("this checkpoint has no motion head: it was trained with another --motion-repr "
                                 "than learned; resume it with the --motion-repr it was trained with")
            load_trainable(self.head, weights["motion_head"])
            self.head_ema.load_state_dict(weights["motion_head_ema"])
