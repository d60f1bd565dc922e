"""Stable Video Diffusion adapter: builds/loads the teacher's parts and conditions them exactly as diffusers'
`StableVideoDiffusionPipeline` does, so the same code serves the tiny preset, the full-size architecture and
real SVD / SVD-XT weights.

SVD image-to-video conditioning (per clip):
- `encoder_hidden_states`: the CLIP image embedding of the first frame, (B, 1, D);
- the VAE latent (distribution mode, *not* scaled) of the noise-augmented first frame, repeated over frames
  and concatenated to the noisy latent on channels (4 + 4 = 8 UNet input channels);
- `added_time_ids = [fps − 1, motion_bucket_id, noise_aug_strength]`.
Video latents are scaled by the VAE's scaling factor (0.18215); the UNet is an EDM v-prediction model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prodistill.diffusion.edm import append_dims, preconditioning
from prodistill.diffusion.solvers import ConditionalDenoiser
from prodistill.models.presets import Preset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEACHER_PARTS = ("unet", "vae", "image_encoder")


class WeightsError(ValueError):
    """Weights given by the user are missing or malformed."""


@dataclass
class SVDCondition:
    """Everything the SVD UNet is conditioned on, batched along dim 0."""

    image_embeds: Tensor
    """(B, 1, D) CLIP image embedding of the first frame."""
    image_latents: Tensor
    """(B, F, 4, h, w) unscaled latent of the noise-augmented first frame, repeated over frames."""
    added_time_ids: Tensor
    """(B, 3): fps − 1, motion_bucket_id, noise_aug_strength."""

    def cat(self, other: "SVDCondition") -> "SVDCondition":
        return SVDCondition(*(torch.cat([a, b]) for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.image_embeds, self.image_latents, self.added_time_ids

    def unconditional(self) -> "SVDCondition":
        """c_zero: image embedding and first-frame latent set to zero, as the SVD pipeline's negative branch."""
        return replace(self, image_embeds=torch.zeros_like(self.image_embeds),
                       image_latents=torch.zeros_like(self.image_latents))


def edm_denoise(unet: nn.Module, x: Tensor, sigma: Tensor, cond: SVDCondition) -> Tensor:
    """D(x, σ) = c_skip·x + c_out·F(c_in·x ⊕ image_latents, c_noise) for latents x (B, F, 4, h, w), σ (B,)."""
    c_skip, c_out, c_in, c_noise = preconditioning(sigma.float())
    model_in = torch.cat([append_dims(c_in, x.ndim).to(x.dtype) * x, cond.image_latents.to(x.dtype)], dim=2)
    out = unet(
        model_in,
        c_noise.to(x.dtype),
        encoder_hidden_states=cond.image_embeds.to(x.dtype),
        added_time_ids=cond.added_time_ids.to(x.dtype),
        return_dict=False,
    )[0]
    return append_dims(c_skip, x.ndim) * x.float() + append_dims(c_out, x.ndim) * out.float()


def unet_encoder_features(unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                          added_time_ids: Tensor) -> list[Tensor]:
    """The encoder half of diffusers' `UNetSpatioTemporalConditionModel.forward` — embeddings, conv_in, down
    blocks, mid block — with the same arguments (`sample` (B, F, C_in, h, w)), stopping before the decoder.

    Returns the last hidden state at each resolution the encoder visits, finest first, the mid block's output
    standing for the coarsest; each (B, F, C_s, h_s, w_s). SVD at 512²: 320@64², 640@32², 1280@16², 1280@8²."""
    b, f = sample.shape[:2]
    emb = unet.time_embedding(unet.time_proj(timestep.expand(b)).to(sample.dtype))
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape(b, -1).to(emb.dtype)
    emb = (emb + unet.add_embedding(time_embeds)).repeat_interleave(f, dim=0)
    context = encoder_hidden_states.repeat_interleave(f, dim=0)
    indicator = torch.zeros(b, f, dtype=sample.dtype, device=sample.device)
    hidden = unet.conv_in(sample.flatten(0, 1))
    by_size: dict[tuple[int, int], Tensor] = {tuple(hidden.shape[-2:]): hidden}
    for block in unet.down_blocks:
        kw = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        hidden, states = block(hidden_states=hidden, temb=emb, image_only_indicator=indicator, **kw)
        for state in states:
            by_size[tuple(state.shape[-2:])] = state
    hidden = unet.mid_block(hidden_states=hidden, temb=emb, encoder_hidden_states=context,
                            image_only_indicator=indicator)
    by_size[tuple(hidden.shape[-2:])] = hidden
    return [t.unflatten(0, (b, f)) for t in by_size.values()]


def check_teacher_folder(path: Path) -> None:
    """Raise WeightsError unless `path` holds the diffusers SVD sub-folders prodistill loads."""
    missing = [p for p in TEACHER_PARTS if not (path / p / "config.json").is_file()]
    if missing:
        raise WeightsError(
            f"--teacher {path} is not a diffusers SVD folder: it lacks {', '.join(p + '/config.json' for p in missing)}; "
            "pass the folder that holds unet/, vae/, image_encoder/ and feature_extractor/ (or a hub id)."
        )


class SVDModels:
    """The frozen teacher UNet, VAE and CLIP image encoder, plus SVD's conditioning logic."""

    def __init__(self, unet: nn.Module, vae: nn.Module, image_encoder: nn.Module,
                 clip_mean=CLIP_MEAN, clip_std=CLIP_STD, clip_size: int | None = None,
                 motion_bucket_id: int = 127, noise_aug_strength: float = 0.02):
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        for m in (unet, vae, image_encoder):
            m.requires_grad_(False).eval()
        self.clip_mean = torch.tensor(clip_mean).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(clip_std).view(1, 3, 1, 1)
        self.clip_size = clip_size or image_encoder.config.image_size
        self.motion_bucket_id = motion_bucket_id
        self.noise_aug_strength = noise_aug_strength
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def build(cls, preset: Preset, teacher: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> "SVDModels":
        """Random init from the preset, or `from_pretrained` of a diffusers SVD folder / hub id."""
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if teacher is None:
            with torch.device(device) if preset.init_on_device else contextlib.nullcontext():
                unet = UNetSpatioTemporalConditionModel(**preset.unet)
                vae = AutoencoderKLTemporalDecoder(**preset.vae)
                enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**preset.image_encoder))
            models = cls(unet, vae, enc)
        else:
            models = cls._from_pretrained(teacher)
        return models.to(device, dtype)

    @classmethod
    def _from_pretrained(cls, teacher: str) -> "SVDModels":
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(teacher).expanduser()
        if path.exists():
            check_teacher_folder(path)
            teacher = str(path)
        try:
            unet = UNetSpatioTemporalConditionModel.from_pretrained(teacher, subfolder="unet")
            vae = AutoencoderKLTemporalDecoder.from_pretrained(teacher, subfolder="vae")
            enc = CLIPVisionModelWithProjection.from_pretrained(teacher, subfolder="image_encoder")
        except (OSError, ValueError, EnvironmentError) as e:
            raise WeightsError(
                f"could not load SVD weights from {teacher!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "pass a local diffusers SVD folder or a hub id reachable from this machine."
            ) from e
        kw = {}
        try:
            proc = CLIPImageProcessor.from_pretrained(teacher, subfolder="feature_extractor")
            kw = dict(clip_mean=tuple(proc.image_mean), clip_std=tuple(proc.image_std))
        except (OSError, ValueError):
            pass  # the processor is optional: SVD's is OpenAI CLIP's mean/std, our defaults
        return cls(unet, vae, enc, **kw)

    def to(self, device, dtype: torch.dtype | None = None) -> "SVDModels":
        for m in (self.unet, self.vae, self.image_encoder):
            nn.Module.to(m, device=device, dtype=dtype)  # diffusers' override warns about a cast we want
        self.clip_mean, self.clip_std = self.clip_mean.to(device), self.clip_std.to(device)
        return self

    # -- the interface methods and samplers use (the analytic benchmark implements the same) -----------------
    @property
    def teacher(self) -> nn.Module:
        return self.unet

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch: int, frames: int, width: int, height: int) -> tuple[int, ...]:
        return (batch, frames, self.latent_channels, height // self.vae_factor, width // self.vae_factor)

    def pixel_size(self, latents: Tensor) -> tuple[int, int]:
        """(W, H) in pixels of latents (..., h, w)."""
        return latents.shape[-1] * self.vae_factor, latents.shape[-2] * self.vae_factor

    def make_student(self, cfg, stage: int) -> nn.Module:
        """Teacher + LoRA (`cfg.lora_*`), plus `cfg.train_modules` trained in full in stage 2."""
        from prodistill.config import csv_items
        from prodistill.models.student import build_student

        return build_student(self.unet, cfg.lora_rank, cfg.lora_alpha, csv_items(cfg.lora_targets),
                             train_modules=csv_items(cfg.train_modules) if stage == 2 else ())

    def denoiser(self, net: nn.Module) -> ConditionalDenoiser:
        """D(x, σ, cond) of `net` (teacher or student) in the models' precision."""

        def d(x: Tensor, sigma: Tensor, cond: SVDCondition) -> Tensor:
            with self.autocast():
                return edm_denoise(net, x, sigma, cond)

        return d

    def encoder_features(self, x: Tensor, sigma: Tensor, cond: SVDCondition) -> list[Tensor]:
        """The frozen teacher's encoder features of noisy latents x (B, F, 4, h, w) at σ (B,), preconditioned as
        `edm_denoise` does (AVDM2's discriminator backbone): `unet_encoder_features`, finest first."""
        _, _, c_in, c_noise = preconditioning(sigma.float())
        model_in = torch.cat([append_dims(c_in, x.ndim).to(x.dtype) * x, cond.image_latents.to(x.dtype)], dim=2)
        with self.autocast():
            return unet_encoder_features(self.unet, model_in, c_noise.to(x.dtype), cond.image_embeds.to(x.dtype),
                                         cond.added_time_ids.to(x.dtype))

    @torch.no_grad()
    def encoder_channels(self, height: int, width: int) -> list[int]:
        """Channels of `encoder_features`' outputs for latents of h×w (one probe forward of a single frame)."""
        c, dev = self.latent_channels, self.device
        cond = SVDCondition(torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=dev),
                            torch.zeros(1, 1, c, height, width, device=dev), torch.zeros(1, 3, device=dev))
        features = self.encoder_features(torch.zeros(1, 1, c, height, width, device=dev), torch.ones(1, device=dev), cond)
        return [f.shape[2] for f in features]

    def image_teacher(self, path: str | None = None):
        """AVDM2's 2D teacher: the diffusers image UNet at `path`, or this video teacher on single frames."""
        from prodistill.models.image_teacher import DiffusersImageTeacher, SVDFrameTeacher

        if path is None:
            return SVDFrameTeacher(self)
        return DiffusersImageTeacher.load(path, self.device, self.dtype, self.scaling_factor)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- encoders ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_posterior(self, pixels: Tensor, chunk: int = 14) -> tuple[Tensor, Tensor]:
        """Pixels (B, F, 3, H, W) in [−1, 1] → the VAE posterior's (mean, std), unscaled, (B, F, 4, H/8, W/8)."""
        b, f = pixels.shape[:2]
        frames = pixels.flatten(0, 1).to(self.device, self.dtype)
        dists = [self.vae.encode(frames[i : i + chunk]).latent_dist for i in range(0, frames.shape[0], chunk)]
        mean = torch.cat([d.mean for d in dists]).float().unflatten(0, (b, f))
        return mean, torch.cat([d.std for d in dists]).float().unflatten(0, (b, f))

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents x0 = (mean + std·ε)·scaling_factor; one draw for the whole batch, so encoding on the
        fly and reading the latent cache consume the generator identically."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    @torch.no_grad()
    def encode_video(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, F, 3, H, W) in [−1, 1] → scaled latents (B, F, 4, H/8, W/8), sampled from the posterior."""
        return self.sample_latents(*self.encode_posterior(pixels), generator)

    @torch.no_grad()
    def encode_image_embeds(self, image: Tensor) -> Tensor:
        """First frame (B, 3, H, W) in [−1, 1] → CLIP image embedding (B, 1, D)."""
        x = F.interpolate(image.float(), size=(self.clip_size, self.clip_size), mode="bicubic",
                          align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.clip_mean) / self.clip_std
        return self.image_encoder(pixel_values=x.to(self.dtype)).image_embeds.unsqueeze(1).float()

    @torch.no_grad()
    def encode_condition(self, image: Tensor, noise: Tensor | None = None,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """First frame (B, 3, H, W) in [−1, 1] → (CLIP embedding (B, 1, D), latent mode of the noise-augmented
        frame (B, 4, h, w)). The augmentation noise is `noise` if given (data-side, per clip), else drawn."""
        image = image.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(image.shape, generator=generator, device=image.device)
        augmented = (image + self.noise_aug_strength * noise.to(image)).to(self.dtype)
        return self.encode_image_embeds(image), self.vae.encode(augmented).latent_dist.mode().float()

    def make_condition(self, image_embeds: Tensor, image_latent: Tensor, num_frames: int, fps: float) -> SVDCondition:
        """Assemble SVD's condition from its encoded parts (repeat the first-frame latent over frames)."""
        b = image_embeds.shape[0]
        time_ids = torch.tensor([[fps - 1, self.motion_bucket_id, self.noise_aug_strength]],
                                device=image_embeds.device).expand(b, 3)
        return SVDCondition(
            image_embeds=image_embeds,
            image_latents=image_latent.unsqueeze(1).expand(b, num_frames, *image_latent.shape[1:]).contiguous(),
            added_time_ids=time_ids.contiguous(),
        )

    def condition(self, image: Tensor, num_frames: int, fps: float, generator: torch.Generator | None = None,
                  noise: Tensor | None = None) -> SVDCondition:
        """SVD's conditioning of a clip on its first frame `image` (B, 3, H, W) in [−1, 1]."""
        return self.make_condition(*self.encode_condition(image, noise, generator), num_frames, fps)

    def prepare_batch(self, batch: dict, fps: float, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, SVDCondition]:
        """A data batch → (scaled latents x0 (B, F, 4, h, w), conditioning). A batch from the latent cache
        (posterior mean/std and encoded condition) skips the encoders and draws the same noise."""
        if "latent_mean" in batch:
            mean, std = (batch[k].to(self.device, torch.float32) for k in ("latent_mean", "latent_std"))
            embeds, image_latent = (batch[k].to(self.device, torch.float32) for k in ("image_embeds", "image_latent"))
            return self.sample_latents(mean, std, generator), self.make_condition(embeds, image_latent, mean.shape[1], fps)
        pixels = batch["pixels"]
        latents = self.encode_video(pixels, generator)
        return latents, self.condition(pixels[:, 0], pixels.shape[1], fps, generator, batch.get("cond_noise"))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, F, 4, h, w) → pixels (B, F, 3, H, W) in [−1, 1] with the temporal decoder."""
        return self.decode_with_grad(latents).clamp(-1, 1)

    def decode_with_grad(self, latents: Tensor) -> Tensor:
        """Like `decode` but differentiable and unclamped (the `--disc-input decoded` ablation trains
        through it); each clip is decoded as one temporal window."""
        b, f = latents.shape[:2]
        z = (latents.flatten(0, 1) / self.scaling_factor).to(self.dtype)
        with self.autocast():
            frames = [self.vae.decode(z[i : i + f], num_frames=f).sample for i in range(0, b * f, f)]
        return torch.cat(frames).float().unflatten(0, (b, f))

    def autocast(self):
        """Mixed precision for models held in bf16/fp16 (trainable fp32 adapters meet frozen bf16 weights)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
