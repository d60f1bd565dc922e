"""AVDM2's 2D teachers: image denoisers that score single frames of a video in the video teacher's latent space.

AVDM2 (§4.2) matches the distribution of K random frames of the generated video to a *2D* (image) diffusion
model's: the gradient (s_real − s_fake) compares the frozen 2D teacher with a 2D "fake" denoiser that learns
the generated frames. Any image model sharing the latent space can be the teacher; here:

- `SVDFrameTeacher` (the default): the SVD teacher itself on single frames — the K frames are folded into the
  batch and each runs as a one-frame video (num_frames = 1), conditioned on its clip's first frame as usual.
- `DiffusersImageTeacher` (`--image-teacher PATH`): a diffusers Stable Diffusion UNet (`UNet2DConditionModel`,
  SD 1.x/2.x, ε- or v-prediction on the DDPM schedule) in SD's latent space, which SVD's VAE shares. It is
  wrapped as an EDM denoiser (σ_EDM = √((1 − ᾱ_t)/ᾱ_t), input scaled by c_in = 1/√(σ²+1), t interpolated on
  its log σ table and clamped to its range) and conditioned on the empty prompt: an image-to-video run has
  no text, so the 2D prior is the image model's unconditional one.

Every 2D teacher has the same three parts: `net` (frozen), `make_fake(cfg)` (a trainable copy that starts
equal to it: teacher + LoRA) and `denoiser(net)` → D₂(x (B, K, C, h, w), σ (B,), cond) → x0 estimate, one σ
per video shared by its K frames (AVDM2 eq. 8).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from prodistill.diffusion.edm import append_dims, preconditioning
from prodistill.models.svd import SVDCondition, SVDModels, WeightsError

IMAGE_TEACHER_PARTS = ("unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                       "tokenizer")


def fold_frames(x: Tensor) -> Tensor:
    """(B, K, C, h, w) → (B·K, 1, C, h, w): each frame a one-frame video."""
    return x.flatten(0, 1).unsqueeze(1)


class SVDFrameTeacher:
    """The SVD teacher run on single frames (num_frames = 1), each conditioned on its clip's first frame."""

    def __init__(self, models: SVDModels):
        self.models = models
        self.net = models.unet

    def make_fake(self, cfg) -> nn.Module:
        """Teacher + LoRA (`--lora-*`; `--train-modules` apply to the generator only)."""
        return self.models.make_student(cfg, stage=1)

    def denoiser(self, net: nn.Module):
        video_d = self.models.denoiser(net)

        def d(x: Tensor, sigma: Tensor, cond: SVDCondition) -> Tensor:
            k = x.shape[1]
            folded = SVDCondition(cond.image_embeds.repeat_interleave(k, 0),
                                  cond.image_latents[:, :1].repeat_interleave(k, 0),
                                  cond.added_time_ids.repeat_interleave(k, 0))
            return video_d(fold_frames(x), sigma.repeat_interleave(k), folded).view(x.shape)

        return d


def check_image_teacher_folder(path: Path) -> None:
    """Raise WeightsError unless `path` holds the parts of a diffusers Stable Diffusion folder we load."""
    missing = [p for p in IMAGE_TEACHER_PARTS if not (path / p).exists()]
    if missing:
        raise WeightsError(f"--image-teacher {path} is not a diffusers Stable Diffusion folder: it lacks "
                           f"{', '.join(missing)}; pass a folder holding unet/, scheduler/, text_encoder/ and tokenizer/")


class DiffusersImageTeacher:
    """A diffusers SD UNet as an EDM denoiser of single frames, conditioned on the empty prompt."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str, context: Tensor):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise WeightsError(f"--image-teacher: prediction type {prediction_type!r} is not supported; "
                               "use an ε- or v-prediction Stable Diffusion UNet")
        self.net = unet.requires_grad_(False).eval()
        self.prediction_type = prediction_type
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double()
        self.log_sigmas = sigmas.log().to(context.device)
        """log σ_EDM of the DDPM timesteps t = 0 … T−1, ascending."""
        self.context = context
        """(1, L, D) text embedding of the empty prompt."""

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, scaling_factor: float
             ) -> "DiffusersImageTeacher":
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(path).expanduser()
        if folder.exists():
            check_image_teacher_folder(folder)
            vae_config = folder / "vae" / "config.json"
            if vae_config.is_file():
                import json

                theirs = json.loads(vae_config.read_text()).get("scaling_factor", 0.18215)
                if abs(theirs - scaling_factor) > 1e-6:
                    raise WeightsError(f"--image-teacher {path}: its VAE scales latents by {theirs}, the video "
                                       f"teacher's by {scaling_factor}; the 2D teacher must share the latent space")
            path = str(folder)
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        except (OSError, ValueError) as e:
            raise WeightsError(f"could not load --image-teacher {path!r} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}); pass a local diffusers Stable Diffusion folder") from e
        if unet.config.in_channels != 4 or unet.config.get("addition_embed_type") is not None:
            raise WeightsError(f"--image-teacher {path}: need an SD 1.x/2.x UNet (4 latent channels, text-only "
                               "conditioning); SDXL-style and inpainting UNets are not supported")
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            context = text_encoder(ids.input_ids)[0]
        nn.Module.to(unet, device=device, dtype=dtype)
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type,
                   context.to(device, torch.float32))

    def make_fake(self, cfg) -> nn.Module:
        """Image UNet + LoRA (`--lora-rank`, `--lora-alpha`, `--lora-targets`)."""
        from prodistill.config import csv_items
        from prodistill.models.student import build_student

        return build_student(self.net, cfg.lora_rank, cfg.lora_alpha, csv_items(cfg.lora_targets))

    def timestep(self, sigma: Tensor) -> Tensor:
        """The fractional DDPM timestep whose σ_EDM is `sigma`, by linear interpolation in log σ, clamped to
        [0, T−1]."""
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_val, hi_val = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return ((hi - 1) + (log_sigma - lo_val) / (hi_val - lo_val)).float()

    def denoiser(self, net: nn.Module):
        dtype = next(net.parameters()).dtype
        device = self.context.device

        def d(x: Tensor, sigma: Tensor, cond) -> Tensor:
            frames = x.flatten(0, 1).float()
            s = sigma.float().repeat_interleave(x.shape[1])
            c_skip, c_out, c_in, _ = preconditioning(s)
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext())
            with autocast:
                out = net((append_dims(c_in, 4) * frames).to(dtype), self.timestep(s).to(dtype),
                          encoder_hidden_states=self.context.expand(len(s), -1, -1).to(dtype)).sample.float()
            if self.prediction_type == "epsilon":
                return (frames - append_dims(s, 4) * out).view(x.shape)
            return (append_dims(c_skip, 4) * frames + append_dims(c_out, 4) * out).view(x.shape)

        return d
