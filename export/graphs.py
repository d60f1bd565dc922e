"""The four exported graphs as torch modules, and the merged student they are traced from.

Every graph takes and returns float32 and casts to the export precision inside, so the runtime's arrays are
float32 whatever the precision, and a strongly typed TensorRT network reads the precision from the graph.

- `ImageEncoderGraph`: CLIP pixels (1, 3, S, S), already resized and normalised → image_embeds (1, 1, D).
- `VaeEncoderGraph`: noise-augmented first frame (1, 3, H, W) in [−1, 1] → image_latent (1, 4, h, w), the
  posterior's mode, unscaled (as `SVDModels.encode_condition`).
- `DenoiserGraph`: the student's EDM denoiser D(x, σ) — `edm_denoise` with its preconditioning in float32
  around the UNet. The consistency parameterisation and the samplers stay outside (numpy, a few
  multiply-adds), because TTS needs D itself and one graph then serves 1-step and TTS.
- `DecoderGraph`: scaled latents (1, F, 4, h, w) → pixels (1, F, 3, H, W) in [−1, 1], the temporal
  decoder over all F frames as one window (`num_frames` is baked into the graph).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from prodistill.accel.rewrites import apply_rewrites
from prodistill.models.svd import SVDCondition, SVDModels, edm_denoise

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def merge_student(student: nn.Module) -> nn.Module:
    """A standalone UNet with the student's LoRA merged into its weights (trained modules kept).

    The student shares its frozen weights with the teacher, and merging writes into them, so this merges into
    a deep copy: the teacher (and the student) are left untouched."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(student)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    return merged.requires_grad_(False).eval()


class _CastUNet(nn.Module):
    """The UNet called as `edm_denoise` calls it, computing in `dtype` and answering in float32."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added_time_ids: Tensor,
                return_dict: bool = False) -> tuple[Tensor]:
        out = self.unet(sample.to(self.dtype), timestep.to(self.dtype),
                        encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                        added_time_ids=added_time_ids.to(self.dtype), return_dict=False)[0]
        return (out.float(),)


class DenoiserGraph(nn.Module):
    inputs = ("x", "sigma", "image_embeds", "image_latents", "added_time_ids")
    outputs = ("denoised",)

    def __init__(self, unet: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.unet = _CastUNet(unet, dtype)

    def forward(self, x: Tensor, sigma: Tensor, image_embeds: Tensor, image_latents: Tensor,
                added_time_ids: Tensor) -> Tensor:
        return edm_denoise(self.unet, x, sigma, SVDCondition(image_embeds, image_latents, added_time_ids))


class ImageEncoderGraph(nn.Module):
    inputs = ("pixel_values",)
    outputs = ("image_embeds",)

    def __init__(self, image_encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.image_encoder, self.dtype = image_encoder, dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.image_encoder(pixel_values=pixel_values.to(self.dtype)).image_embeds.unsqueeze(1).float()


class VaeEncoderGraph(nn.Module):
    inputs = ("image",)
    outputs = ("image_latent",)

    def __init__(self, vae: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.vae, self.dtype = vae, dtype

    def forward(self, image: Tensor) -> Tensor:
        return self.vae.encode(image.to(self.dtype)).latent_dist.mode().float()


class DecoderGraph(nn.Module):
    inputs = ("latents",)
    outputs = ("pixels",)

    def __init__(self, vae: nn.Module, scaling_factor: float, dtype: torch.dtype):
        super().__init__()
        self.vae, self.scaling_factor, self.dtype = vae, scaling_factor, dtype

    def forward(self, latents: Tensor) -> Tensor:
        b, f = latents.shape[:2]
        z = (latents.flatten(0, 1) / self.scaling_factor).to(self.dtype)
        return self.vae.decode(z, num_frames=f).sample.float().unflatten(0, (b, f)).clamp(-1, 1)


class TinyDecoderGraph(nn.Module):
    """The distilled tiny temporal decoder (`prodistill.models.tiny_decoder`) in place of the VAE's: same input
    and output as `DecoderGraph`, so the runtime does not tell them apart."""

    inputs = ("latents",)
    outputs = ("pixels",)

    def __init__(self, decoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder, self.dtype = decoder, dtype

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents.to(self.dtype)).float().clamp(-1, 1)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computing its statistics and affine in float32 inside a low-precision graph (input and the
    weight and bias cast up, output cast back), as torch's autocast does for normalisation. The parameters stay
    in the graph's dtype: diffusers' temporal decoder casts its activations to the dtype of its up-blocks' first
    parameter (a norm's weight), so float32 norm weights turned the whole fp16 decoder float32 (measured on an
    H100: "Input type (float) and bias type (c10::Half) should be the same" at export).

    This was added for the full-size fp16 denoiser's ONNX Runtime parity failure at 1024×576 (relative error
    1.31) and did not fix it; chunking the attention did (`export.onnx_export.chunked_attention`). It stays as the
    precision torch itself uses for these statistics (a group at 1024×576 reduces over 92,160 values)."""

    @classmethod
    def replacing(cls, norm: nn.GroupNorm) -> "Fp32GroupNorm":
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device=norm.weight.device,
                  dtype=norm.weight.dtype)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = (None, None) if self.weight is None else (self.weight.float(), self.bias.float())
        return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def keep_group_norms_fp32(module: nn.Module) -> nn.Module:
    """Replace every nn.GroupNorm of `module` (in place) by an `Fp32GroupNorm` with the same parameters."""
    for name, child in list(module.named_modules()):
        if type(child) is nn.GroupNorm:
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, Fp32GroupNorm.replacing(child))
    return module


def build_graphs(models: SVDModels, merged_unet: nn.Module, precision: str,
                 tiny_decoder: nn.Module | None = None) -> dict[str, nn.Module]:
    """The four graph modules in `precision`. The encoders and the VAE are cast on copies (the caller's
    models stay as they are); `merged_unet`, already a copy, is cast in place. Below float32, group norms keep
    float32 statistics (`Fp32GroupNorm`), replaced after the cast. The UNet is exported with training's exact
    rewrite: its one-key cross-attention is its projected value. With `tiny_decoder` (`--decoder tiny`) the
    decoder graph is that network's (cast on a copy)."""
    dtype = PRECISIONS[precision]

    def cast(m: nn.Module) -> nn.Module:
        m = nn.Module.to(m, dtype=dtype)  # nn.Module's: diffusers' override warns about a cast we want
        return m if dtype == torch.float32 else keep_group_norms_fp32(m)

    vae = cast(copy.deepcopy(models.vae))
    apply_rewrites([merged_unet])  # the same function with less work (prodistill.accel.rewrites)
    return {
        "image_encoder": ImageEncoderGraph(cast(copy.deepcopy(models.image_encoder)), dtype).eval(),
        "vae_encoder": VaeEncoderGraph(vae, dtype).eval(),
        "denoiser": DenoiserGraph(cast(merged_unet), dtype).eval(),
        "decoder": (DecoderGraph(vae, models.scaling_factor, dtype) if tiny_decoder is None
                    else TinyDecoderGraph(cast(copy.deepcopy(tiny_decoder)), dtype)).eval(),
    }
