"""The yardstick of `prodistill bench train`: the same OSV / LCM iteration written as a plain script would
write it on diffusers, transformers and peft — eager, bf16 autocast, the EMA target through `functional_call`,
the CFG branches batched as 2B, default (foreach) AdamW — and nothing of prodistill's trainer, methods or
speed-ups. It is what ../shared/GPU.md measured as "a plain diffusers-eager script" (1.16 s/it at 512² on an
H200), kept in the package so every speed-up is measured against it in the same process.

It shares only the networks with the configurations it is compared with (the frozen teacher, a LoRA'd student
built the same way, the same latent discriminator), so the work per iteration is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from prodistill.diffusion.edm import training_grid
from prodistill.models.discriminator import LatentVideoDiscriminator, build_dinov2
from prodistill.models.presets import get_preset
from prodistill.models.student import trainable_parameters


class PlainStep:
    """One plain iteration: `PlainStep(cfg, models, generator)(batch)` trains one step and returns the loss."""

    def __init__(self, cfg, models, generator: torch.Generator):
        self.cfg, self.models, self.gen = cfg, models, generator
        self.stage = 1 if (cfg.method == "osv" and cfg.stages()[0] == 1) else 2
        self.m = 1 if cfg.method == "lcm" else cfg.solver_steps
        self.unet = models.teacher
        from prodistill.accel.layout import set_conv_layout

        set_conv_layout([self.unet], False)  # a plain script's NCHW weights, whatever an earlier configuration set
        self.student = models.make_student(cfg, self.stage)
        self.lora = trainable_parameters(self.student)
        self.ema = {k: p.detach().clone() for k, p in self.lora.items()}
        self.disc = None
        device = models.device
        if cfg.method == "osv":
            backbone = build_dinov2(cfg.dino, cfg.preset).to(device, models.dtype)
            self.disc = LatentVideoDiscriminator(backbone, latent_channels=models.latent_channels,
                                                 upscale=cfg.disc_upscale,
                                                 image_size=get_preset(cfg.preset).disc_image_size,
                                                 head_channels=cfg.disc_head_channels).to(device)
            for p in self.disc.trainable_parameters():
                p.data = p.data.float()
            self.opt_d = torch.optim.AdamW(self.disc.trainable_parameters(), lr=cfg.disc_lr)
        self.opt_g = torch.optim.AdamW(list(self.lora.values()), lr=cfg.lr)
        self.grid = training_grid(cfg.num_timesteps).to(device, torch.float32)

    def denoise(self, net, x, sigma, cond, params=None):
        """SVD's EDM v-prediction denoiser, written out."""
        s = sigma.view(-1, 1, 1, 1, 1)
        c_skip, c_out, c_in = 1 / (s**2 + 1), -s / (s**2 + 1).sqrt(), 1 / (s**2 + 1).sqrt()
        args = (torch.cat([c_in * x, cond.image_latents], dim=2), 0.25 * sigma.log())
        kwargs = dict(encoder_hidden_states=cond.image_embeds, added_time_ids=cond.added_time_ids, return_dict=False)
        out = (functional_call(net, params, args, kwargs) if params else net(*args, **kwargs))[0]
        return c_skip * x + c_out * out.float()

    def consistency(self, x, sigma, denoised):
        s = (sigma - 0.002).view(-1, 1, 1, 1, 1)
        return x / (s**2 + 1) + s / (sigma.view(-1, 1, 1, 1, 1) ** 2 + 1).sqrt() * denoised

    def __call__(self, batch: dict) -> torch.Tensor:
        cfg, models = self.cfg, self.models
        x0, cond = models.prepare_batch(batch, cfg.fps, self.gen)
        b = x0.shape[0]
        eps = torch.randn(x0.shape, generator=self.gen, device=x0.device)
        with torch.autocast(x0.device.type, dtype=models.dtype, enabled=models.dtype != torch.float32):
            if self.stage == 1:
                n = torch.randint(0, cfg.num_timesteps, (b,), generator=self.gen, device=x0.device)
                sigma = self.grid[n]
                x_t = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
                real = x0
            else:
                n = torch.randint(0, cfg.num_timesteps - self.m, (b,), generator=self.gen, device=x0.device)
                sigma = self.grid[n + self.m]
                x_t = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
                w = torch.linspace(cfg.guidance_min, cfg.guidance_max, x0.shape[1], device=x0.device)
                w = w.view(1, -1, 1, 1, 1)
                both = type(cond)(*(torch.cat([torch.zeros_like(t), t]) if i < 2 else torch.cat([t, t])
                                    for i, t in enumerate(cond.astuple())))
                with torch.no_grad():
                    x = x_t
                    for j in range(self.m, 0, -1):  # m guided Euler steps of the teacher
                        s_hi, s_lo = self.grid[n + j], self.grid[n + j - 1]
                        d_u, d_c = self.denoise(self.unet, torch.cat([x, x]), torch.cat([s_hi, s_hi]), both).chunk(2)
                        d = d_u + w * (d_c - d_u)
                        x = x + (s_lo - s_hi).view(-1, 1, 1, 1, 1) * (x - d) / s_hi.view(-1, 1, 1, 1, 1)
                    s_lo = self.grid[n]
                    real = self.consistency(x, s_lo, self.denoise(self.student, x, s_lo, cond, self.ema))
            fake = self.consistency(x_t, sigma, self.denoise(self.student, x_t, sigma, cond))
            c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * x0[0].numel() ** 0.5
            loss = ((real - fake).pow(2).flatten(1).sum(1) + c * c).sqrt().sub(c).mean()
            if self.disc is not None:
                lam = cfg.lambda_lgp if self.stage == 1 else cfg.lambda_acd
                loss = loss + lam * F.relu(1 - self.disc(fake).float()).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.lora.values()), cfg.grad_clip)
        self.opt_g.step()
        with torch.no_grad():
            for k, p in self.lora.items():
                self.ema[k].lerp_(p.detach(), 1 - cfg.ema_decay)
        if self.disc is not None:
            with torch.autocast(x0.device.type, dtype=models.dtype, enabled=models.dtype != torch.float32):
                d_loss = (F.relu(1 - self.disc(real.detach()).float()).mean()
                          + F.relu(1 + self.disc(fake.detach()).float()).mean())
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.disc.trainable_parameters(), cfg.grad_clip)
            self.opt_d.step()
        return loss.detach()
