"""AVDM2 (Zhu et al. 2024, "Accelerating Video Diffusion Models via Distribution Matching") on the shared trainer.

A few-step generator G_θ (teacher + LoRA, k = `--student-steps`; its clean estimate is the denoiser's output
D_θ, so it starts as the teacher's denoiser — no consistency wrapper) is trained from noise, never from a
teacher trajectory, by two distribution-matching losses (eq. 9: λ_SDM·L_SDM + λ_ADM·L_ADM):

- **Backward simulation** (§4, after Imagine Flash and DMD2): each generated video is the generator's own
  k-step sample stopped at a random step j — the noisy state the sampler would hand it at σ_j — denoised by
  G_θ with gradient. Training inputs are thus exactly what the k-step sampler feeds the network.
- **Video adversarial distribution matching** (§4.1, eq. 5-7): real and generated latents are noised at
  t ~ U[0, 0.5T]; the discriminator is the frozen teacher UNet's encoder (`encoder_features` of the models)
  plus a trainable multi-scale head (`MultiScaleHead`), one logit per video; logistic discriminator loss,
  non-saturating generator loss.
- **2D score distribution matching** (§4.2, eq. 8): K random frames of each generated video, noised at
  t ~ U[0.2T, 0.98T], are denoised by a frozen 2D teacher and a trainable 2D "fake" denoiser; the generator's
  frames move along (D_real − D_fake), normalised per frame by mean|x0 − D_real| as DMD2 does (its w(t)).
  The fake learns the generated frames with the denoising loss (eq. 2), from a copy of the 2D teacher.
- Two-timescale updates: discriminator and fake score `--critic-steps` (2) times per generator update, each
  round on a fresh generated sample, as DMD2's alternating schedule; AdamW, no EMA (§5.1).

The noise ranges are the paper's own: T is the 1000-step DDPM schedule of its SD-based teacher, whose latent
space SVD shares, so t ~ U[0.2T, 0.98T] is σ = √((1 − ᾱ_t)/ᾱ_t) ∈ [0.57, 13.0] and t ~ U[0, 0.5T] is
σ ∈ [0.029, 1.62] (`ddpm_sigmas`), whatever our training grid. Where the paper is silent (README "AVDM2"):
λ_SDM = λ_ADM = 1, K = 4, one σ per video for its K frames, the head's layer sizes, the fake score trained on K
random frames with LoRA (not a full copy).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from prodistill.diffusion.edm import append_dims, ddpm_sigmas
from prodistill.diffusion.losses import logistic_d_loss, logistic_g_loss
from prodistill.diffusion.samplers import consistency_sample
from prodistill.diffusion.solvers import bind
from prodistill.methods.base import Method, StepOutput
from prodistill.methods.consistency import preview_student
from prodistill.models.encoder_discriminator import MultiScaleHead
from prodistill.models.student import load_trainable, trainable_parameters
from prodistill.sampling import student_sigmas

DISC_SCALES = 3
"""The head reads the encoder's coarsest three resolutions (§4.1: "features from three spatial scales")."""

MOTION = re.compile(r"temporal_|time_mixer|time_pos_embed")
"""Names of the SVD UNet's temporal ("motion module") parameters, trained at `--motion-lr-scale`× the lr."""


DDPM_STEPS = 1000
"""T of the paper's noise ranges: the DDPM schedule of its SD-based teacher (`ddpm_sigmas`)."""


def timestep_range(t_min: float, t_max: float, num_train_timesteps: int = DDPM_STEPS) -> tuple[int, int]:
    """Inclusive integer timesteps [⌈t_min·T⌉, min(⌊t_max·T⌋, T − 1)] of the paper's t ~ U[t_min·T, t_max·T]."""
    lo = math.ceil(round(t_min * num_train_timesteps, 9))
    hi = min(math.floor(round(t_max * num_train_timesteps, 9)), num_train_timesteps - 1)
    if lo > hi:
        raise ValueError(f"the noise range [{t_min}, {t_max}] holds no timestep of the {num_train_timesteps}-step "
                         "schedule; widen it")
    return lo, hi


def distribution_matching_loss(x0: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """AVDM2 eq. 8 as DMD2 implements it, for generated frames x0 (B, K, C, h, w) (with gradient) and the
    2D teacher's and fake's denoised estimates `real`, `fake` of their noised versions (no gradient).

    grad = (D_fake − D_real) / mean|x0 − D_real| per frame — (ε_real − ε_fake) up to a positive factor, times
    DMD2's normalisation as w(t) — and loss = ½·mean((x0 − sg(x0 − grad))²), whose gradient in x0 is
    grad / x0.numel(): descending it moves each frame towards the teacher's estimate and away from the fake's.
    """
    with torch.no_grad():
        scale = (x0 - real).abs().mean(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12)
        grad = (fake.float() - real.float()) / scale
    x0 = x0.float()
    return 0.5 * (x0 - (x0 - grad).detach()).pow(2).mean()


def denoising_loss(denoised: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Eq. 2, ‖ε̂ − ε‖² with ε̂ = (x_σ − D)/σ, written as ‖(D − x0)/σ‖² (x_σ = x0 + σ·ε); σ (B,)."""
    return ((denoised.float() - x0.float()) / append_dims(sigma.float(), x0.ndim)).pow(2).mean()


class AVDM2(Method):
    name = "avdm2"
    phases = ("generator", "discriminator", "fake_score")
    consistency = False
    """G_θ(x_σ) = D_θ(x_σ, σ): the generator starts as the teacher's denoiser (Algorithm 1, line 2)."""

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.parallel == "fsdp":
            raise ValueError("--method avdm2 does not support --parallel fsdp yet: backward simulation stops each "
                             "rank's sampler at its own random step, so the ranks would run different numbers of "
                             "sharded forwards and hang; use --parallel ddp")

    @classmethod
    def default_sample_steps(cls, cfg) -> int:
        return cfg.student_steps

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        if stage != 2:
            raise ValueError(f"AVDM2 is single-stage and runs as stage 2 (cfg.stages() == (2,)), got stage {stage}")
        self.cfg, self.models, self.stage, self.generator = cfg, models, stage, generator
        device = models.device
        self.student = models.make_student(cfg, stage)
        self.trainable = trainable_parameters(self.student)
        self.student_d = models.denoiser(self.student)
        self.teacher_2d = models.image_teacher(cfg.image_teacher)
        self.fake = self.teacher_2d.make_fake(cfg)
        self.fake_trainable = trainable_parameters(self.fake)
        self.real_2d = self.teacher_2d.denoiser(self.teacher_2d.net)
        self.fake_2d = self.teacher_2d.denoiser(self.fake)
        width, height = cfg.size()
        latent_hw = models.latent_shape(1, 1, width, height)[-2:]
        self.head = MultiScaleHead(models.encoder_channels(*latent_hw)[-DISC_SCALES:],
                                   cfg.disc_head_channels).to(device)
        self.sigmas = student_sigmas(cfg.student_steps, cfg.num_timesteps)[0].to(device)
        """The k-step sampler's σ (descending): backward simulation stops at one of them."""
        self.ddpm = ddpm_sigmas(DDPM_STEPS).to(device, torch.float32)
        """σ of the paper's timesteps t = 0 … T−1, which its noise ranges are fractions of."""
        self.adm_range = timestep_range(cfg.adm_t_min, cfg.adm_t_max)
        self.sdm_range = timestep_range(cfg.sdm_t_min, cfg.sdm_t_max)
        self.round = 0

    # -- the trainer's contract -----------------------------------------------------------------------------
    def parameters(self, phase: str) -> list[dict]:
        cfg = self.cfg
        if phase == "generator":
            motion = [p for n, p in self.trainable.items() if MOTION.search(n)]
            spatial = [p for n, p in self.trainable.items() if not MOTION.search(n)]
            groups = [{"params": spatial, "lr": cfg.lr}, {"params": motion, "lr": cfg.lr * cfg.motion_lr_scale}]
            return [g for g in groups if g["params"]]
        params = self.head.parameters() if phase == "discriminator" else self.fake_trainable.values()
        return [{"params": list(params), "lr": cfg.disc_lr}]

    def updates_per_step(self, phase: str) -> int:
        return 1 if phase == "generator" else self.cfg.critic_steps

    def begin_round(self, index: int) -> None:
        self.round = index

    def compute(self, phase: str, batch: dict, cache: dict) -> StepOutput:
        """`cache` (per micro-batch) holds the real latents, the condition object and "fake/r", the generated
        sample of round r (the generator's in round 0, a fresh one drawn by the first critic of later rounds)."""
        if phase == "generator":
            return self._generator(batch)
        fake, fresh = self._round_sample(cache)
        out = self._discriminator(cache, fake) if phase == "discriminator" else self._fake_score(cache, fake)
        out.cache.update(fresh)
        return out

    # -- random draws (all from the method's generator, saved with every checkpoint) ------------------------
    def _randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _noise_level(self, t_range: tuple[int, int], batch: int) -> Tensor:
        """σ (B,) of timesteps t uniform in `t_range` (inclusive)."""
        t = torch.randint(t_range[0], t_range[1] + 1, (batch,), generator=self.generator, device=self.ddpm.device)
        return self.ddpm[t]

    def _noised(self, x0: Tensor, sigma: Tensor) -> Tensor:
        return x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * self._randn(x0)

    def _random_frames(self, video: Tensor) -> Tensor:
        """K = `--sdm-frames` distinct random frames of each video: (B, F, C, h, w) → (B, K, C, h, w)."""
        b, f = video.shape[:2]
        order = torch.rand(b, f, generator=self.generator, device=video.device).argsort(dim=1)
        return video[torch.arange(b, device=video.device)[:, None], order[:, : self.cfg.sdm_frames]]

    # -- the generator and its samples ----------------------------------------------------------------------
    def generate(self, cond, shape: tuple[int, ...], step: int | None = None) -> Tensor:
        """Backward simulation: the generator's k-step sampler from fresh noise, stopped at step j (random
        in [0, k) unless `step` is given; read on the host, since the loop length depends on it), then one
        generator call at σ_j — with gradient where grad mode is on. At j = k−1 this is the k-step sample."""
        k = len(self.sigmas)
        j = int(torch.randint(0, k, (1,), generator=self.generator, device=self.ddpm.device)) if step is None else step
        noise = torch.randn(shape, generator=self.generator, device=self.ddpm.device)
        with torch.no_grad():
            x = consistency_sample(bind(self.student_d, cond), noise, self.sigmas, self.generator, stop=j,
                                   consistency=False)
        return self.student_d(x, self.sigmas[j].expand(shape[0]), cond)

    def _round_sample(self, cache: dict) -> tuple[Tensor, dict]:
        """(this round's generated sample, what to add to the cache): round 0 reuses the generator's; a later
        round draws a fresh one (no gradient) from the generator as it is now, once for both critics."""
        key = f"fake/{self.round}"
        if key in cache:
            return cache[key], {}
        with torch.no_grad():
            fake = self.generate(cache["cond"], tuple(cache["real"].shape))
        return fake, {key: fake}

    def _disc_logits(self, x0: Tensor, cond) -> Tensor:
        """D_η(x_t, t) (B,): x0 noised at t ~ U[adm_t_min·T, adm_t_max·T] through encoder and head (eq. 6)."""
        sigma = self._noise_level(self.adm_range, x0.shape[0])
        return self.head(self.models.encoder_features(self._noised(x0, sigma), sigma, cond)[-DISC_SCALES:])

    def _generator(self, batch: dict) -> StepOutput:
        cfg = self.cfg
        x0, cond = self.models.prepare_batch(batch, cfg.fps, self.generator)
        fake = self.generate(cond, tuple(x0.shape))
        adm = logistic_g_loss(self._disc_logits(fake, cond))  # eq. 7, non-saturating
        frames = self._random_frames(fake)  # G^K_θ(ε)
        sigma = self._noise_level(self.sdm_range, frames.shape[0])
        noisy = self._noised(frames.detach(), sigma)
        with torch.no_grad():
            real_2d, fake_2d = self.real_2d(noisy, sigma, cond), self.fake_2d(noisy, sigma, cond)
        sdm = distribution_matching_loss(frames, real_2d, fake_2d)  # eq. 8
        loss = cfg.lambda_sdm * sdm + cfg.lambda_adm * adm  # eq. 9
        logs = {"loss/adm": adm.detach(), "loss/sdm": sdm.detach(), "loss/g_total": loss.detach()}
        return StepOutput(loss, logs, {"real": x0.detach(), "cond": cond, "fake/0": fake.detach()})

    def _discriminator(self, cache: dict, fake: Tensor) -> StepOutput:
        real_logits = self._disc_logits(cache["real"], cache["cond"])
        fake_logits = self._disc_logits(fake, cache["cond"])
        loss = logistic_d_loss(real_logits, fake_logits)  # eq. 6, maximised over η ⇔ this minimised
        logs = {"loss/d": loss.detach(), "d/logits_real": real_logits.detach().mean(),
                "d/logits_fake": fake_logits.detach().mean()}
        return StepOutput(loss, logs)

    def _fake_score(self, cache: dict, fake: Tensor) -> StepOutput:
        frames = self._random_frames(fake)
        sigma = self._noise_level(self.sdm_range, frames.shape[0])  # Algorithm 1, line 13: t ~ (t_min, t_max)
        loss = denoising_loss(self.fake_2d(self._noised(frames, sigma), sigma, cache["cond"]), frames, sigma)
        return StepOutput(loss, {"loss/fake_score": loss.detach()})

    # -- the rest of the contract ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        for module in (self.student, self.head, self.fake):
            module.train(mode)

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {"student": dict(self.trainable), "discriminator": self.head.state_dict(),
                "fake_score": dict(self.fake_trainable)}

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        load_trainable(self.student, weights["student"])
        self.head.load_state_dict(weights["discriminator"])
        load_trainable(self.fake, weights["fake_score"])

    def preview(self, batch: dict, generator: torch.Generator) -> Tensor:
        return preview_student(self.cfg, self.models, self.student_d, batch, generator, self.cfg.student_steps,
                               consistency=False)


__all__ = ["AVDM2", "DDPM_STEPS", "distribution_matching_loss", "denoising_loss", "timestep_range"]
