"""The merged student as a diffusers `StableVideoDiffusionPipeline` folder, for users who serve with diffusers.

The folder holds the merged UNet, the teacher's VAE and CLIP image encoder, a CLIP feature extractor with the
teacher's mean/std, and SVD's own Euler scheduler configuration (EDM σ from 0.002 to 700, Karras spacing,
v-prediction, continuous c_noise timesteps). With `num_inference_steps=1` and no guidance
(`max_guidance_scale=1`), diffusers' Euler step from σ_max to 0 returns D(x, σ_max), which is the student's
1-step consistency output f(x, σ_max) up to c_skip^CM(700) ≈ 2e-6 and c_out^CM(700) ≈ 1 − 4e-6. More
Euler steps are an ODE sampler, not the consistency sampler the student was trained for; the Time Travel
Sampler is only in prodistill's own samplers and the torch-free runtime.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prodistill.models.svd import SVDModels

SVD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
    sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous", steps_offset=1,
)
"""The scheduler configuration of the SVD / SVD-XT releases (their scheduler/scheduler_config.json)."""


def write_diffusers_folder(models: SVDModels, merged_unet: nn.Module, out: Path) -> Path:
    """Save a folder that `StableVideoDiffusionPipeline.from_pretrained(out)` loads (safetensors weights)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    size = models.clip_size
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[float(v) for v in models.clip_mean.flatten()],
        image_std=[float(v) for v in models.clip_std.flatten()],
    )
    pipeline = StableVideoDiffusionPipeline(
        vae=models.vae, image_encoder=models.image_encoder, unet=merged_unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER), feature_extractor=feature_extractor,
    )
    pipeline.save_pretrained(str(out), safe_serialization=True)
    return out
