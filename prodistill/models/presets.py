"""Model presets: the architectures prodistill builds when no weights are given.

`tiny` is the same classes as SVD with toy widths (random init; CPU tests and the default run);
`svd-xt` is the full-size SVD-XT architecture with random weights (what the performance benchmarks run).
Real weights come from `--teacher` (a diffusers SVD folder or hub id) and `--dino`; the DINOv2
architectures of both presets live with the discriminator (`models/discriminator.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    image_encoder: dict[str, Any]
    resolution: tuple[int, int]
    """Default training resolution (W, H) in pixels."""
    disc_image_size: int
    """Side of the square image fed to DINOv2 (a multiple of its patch size)."""
    train_defaults: dict[str, Any] = field(default_factory=dict)
    """Training hyper-parameters this preset changes from the paper's (used only where the user set none)."""
    init_on_device: bool = False
    """Draw the random weights on the target device (seconds on a GPU instead of a minute on the host for the
    full-size models; the weights then depend on the device type, which only random-weight benchmarks see)."""


TINY = Preset(
    name="tiny",
    unet=dict(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=14,
    ),
    vae=dict(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
    ),
    image_encoder=dict(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    ),
    resolution=(64, 64),
    disc_image_size=32,
    train_defaults=dict(lr=1e-4, disc_lr=1e-4, lora_rank=4, stage1_steps=60, stage2_steps=120, ckpt_every=50,
                        sample_every=0, log_every=10, warmup_steps=10),
)

SVD_XT = Preset(
    name="svd-xt",
    unet=dict(num_frames=25),  # UNetSpatioTemporalConditionModel's defaults are the SVD(-XT) UNet
    vae=dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ),
    image_encoder=dict(  # OpenCLIP ViT-H/14 vision tower with a 1024-d projection
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1024,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
    resolution=(1024, 576),
    disc_image_size=224,
    init_on_device=True,
)

PRESETS = {p.name: p for p in (TINY, SVD_XT)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
