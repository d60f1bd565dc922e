"""OSV latent video discriminator (SPEC §3, "Latent discriminator").

OSV's key efficiency idea: the discriminator never decodes latents with the VAE.
Latent frames go through a tiny sub-pixel upsampler (channel-expanding conv, then
``PixelShuffle``) straight into a *frozen* DINOv2 backbone; small trainable heads
read patch features from several backbone layers:

* spatial heads  - 2D conv blocks over the patch grid of each frame (per-patch logits);
* temporal heads - 1D conv blocks over the frame axis at each patch location.

The backbone's weights never receive gradients, but gradients do flow *through* it
to the input, because the generator is trained through the discriminator.

A ``"pixel"`` input mode reproduces the paper's ablation (decode latents with the
VAE first, then DINOv2 on ImageNet-normalised RGB).

Conventions
-----------
* Layer indices are 1-based indices into DINOv2's ``hidden_states`` tuple
  (``output_hidden_states=True``): ``hidden_states[0]`` is the embedding output and
  ``hidden_states[i]`` the output of transformer block ``i`` (before the final
  LayerNorm). Valid indices: ``1 .. config.num_hidden_layers``.
* Logits layout: ``forward`` returns ``(B, K)``. For each selected layer, in the
  order of ``layer_indices``, a spatial block then a temporal block (unless
  the temporal heads are turned off) are concatenated; every block holds ``F * hp * wp`` logits laid out frame-major
  ``(F, hp, wp)`` (also for the temporal heads, whose logit for frame ``f`` at
  patch ``(y, x)`` is the 1D-conv output at time ``f``). ``split_logits`` undoes
  this into named ``(B, F, hp, wp)`` tensors.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LatentUpsampler",
    "SpatialHead",
    "TemporalHead",
    "DiscriminatorHeads",
    "LatentVideoDiscriminator",
    "build_dinov2",
    "build_discriminator",
    "default_layer_indices",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------
# Upsampler (replaces the VAE decoder)
# --------------------------------------------------------------------------------------
class LatentUpsampler(nn.Module):
    """Sub-pixel latent upsampler, the OSV replacement for the VAE decoder (appendix D).

    Exact op order (a fused kernel will replace exactly this sequence)::

        y = conv2d(x, weight, bias, stride=1, padding=1)      # (N, C, h, w) -> (N, out*r*r, h, w), 3x3 kernel
        y = pixel_shuffle(y, r)                                # -> (N, out, h*r, w*r)
        y = group_norm(y, num_groups=1, gn_weight, gn_bias, eps)  # per-image norm over (out, h*r, w*r), affine per channel

    ``pixel_shuffle`` follows ``torch.nn.PixelShuffle``: output channel ``c`` at
    ``(y*r + i, x*r + j)`` reads conv channel ``c*r*r + i*r + j`` at ``(y, x)``.
    """

    def __init__(self, latent_channels: int = 4, out_channels: int = 3, upscale: int = 4, eps: float = 1e-5):
        super().__init__()
        if upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {upscale}")
        self.latent_channels = latent_channels
        self.out_channels = out_channels
        self.upscale = upscale
        self.conv = nn.Conv2d(latent_channels, out_channels * upscale * upscale, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)
        self.norm = nn.GroupNorm(1, out_channels, eps=eps, affine=True)
        self.fused = False
        """Run the sequence as `ops.fused_latent_upsampler` (set by prodistill.accel for `--fused-ops`)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return self.norm(self.shuffle(self.conv(x)))
        import ops

        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        params = (self.conv.weight, self.conv.bias, self.norm.weight, self.norm.bias)
        return ops.fused_latent_upsampler(x.to(dtype), *(p.to(dtype) for p in params), self.upscale,
                                          self.norm.eps, fused=True)


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------
def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm groups)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _ConvHead(nn.Module):
    """conv(k=3) -> GroupNorm -> LeakyReLU -> conv(k=1) to one logit channel; `conv` is nn.Conv2d or nn.Conv1d."""

    conv: type[nn.Module]

    def __init__(self, in_channels: int, hidden_channels: int = 64, negative_slope: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            self.conv(in_channels, hidden_channels, kernel_size=3, padding=1),
            nn.GroupNorm(_num_groups(hidden_channels), hidden_channels),
            nn.LeakyReLU(negative_slope),
            self.conv(hidden_channels, 1, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SpatialHead(_ConvHead):
    """Per-frame 2D conv head: (N, C, hp, wp) -> (N, 1, hp, wp) per-patch logits."""

    conv = nn.Conv2d


class TemporalHead(_ConvHead):
    """Per-location 1D conv head over frames: (M, C, F) -> (M, 1, F) logits."""

    conv = nn.Conv1d


class DiscriminatorHeads(nn.Module):
    """One spatial and (with ``temporal``) one temporal head per selected backbone layer.

    ``forward(features, batch, frames)`` takes a list of per-layer patch maps of
    shape ``(B*F, C, hp, wp)`` (frame index fastest within each video, i.e. the
    ``(B, F)`` flattening of ``video.flatten(0, 1)``) and returns ``(B, K)`` logits
    laid out as described in the module docstring. Without temporal heads every
    frame is judged as an independent image (MCM's frame discriminator).
    """

    def __init__(self, feature_dim: int, num_layers: int, hidden_channels: int = 64, temporal: bool = True):
        super().__init__()
        self.num_layers = num_layers
        self.spatial = nn.ModuleList(SpatialHead(feature_dim, hidden_channels) for _ in range(num_layers))
        self.temporal = (nn.ModuleList(TemporalHead(feature_dim, hidden_channels) for _ in range(num_layers))
                         if temporal else None)

    def forward(self, features: Sequence[Tensor], batch: int, frames: int) -> Tensor:
        if len(features) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} feature maps, got {len(features)}")
        out: list[Tensor] = []
        for i, (feat, s_head) in enumerate(zip(features, self.spatial)):
            bf, c, hp, wp = feat.shape
            # spatial: (B*F, 1, hp, wp) -> (B, F*hp*wp)
            out.append(s_head(feat).reshape(batch, frames * hp * wp))
            if self.temporal is None:
                continue
            t_head = self.temporal[i]
            # temporal: (B*F, C, hp, wp) -> (B*hp*wp, C, F)
            seq = feat.reshape(batch, frames, c, hp, wp).permute(0, 3, 4, 2, 1).reshape(batch * hp * wp, c, frames)
            t = t_head(seq)  # (B*hp*wp, 1, F)
            t = t.reshape(batch, hp, wp, frames).permute(0, 3, 1, 2)  # (B, F, hp, wp)
            out.append(t.reshape(batch, frames * hp * wp))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------
def default_layer_indices(num_hidden_layers: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced 1-based layer indices ending at the last layer.

    12 layers -> [3, 6, 9, 12]; 4 -> [1, 2, 3, 4]; fewer layers than ``count`` -> all.
    """
    count = min(count, num_hidden_layers)
    idx = [round(num_hidden_layers * (k + 1) / count) for k in range(count)]
    return sorted(set(max(1, i) for i in idx))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


class LatentVideoDiscriminator(nn.Module):
    """Frozen DINOv2 + trainable spatial/temporal heads over video latents (or frames).

    Args:
        backbone: a ``transformers.Dinov2Model``; frozen here (``requires_grad_(False)``,
            always in eval mode) but differentiable w.r.t. its input.
        layer_indices: 1-based indices into ``hidden_states`` (0 = embeddings, so
            ``1..num_hidden_layers`` = outputs of the transformer blocks). Default:
            4 evenly spaced layers ending at the last one.
        latent_channels: channels of the input latents (``"latent"`` mode).
        upscale: PixelShuffle factor ``r`` of the upsampler.
        image_size: side (or ``(H, W)``) of the backbone input; each side must be a
            multiple of the backbone patch size.
        head_channels: hidden width of the heads.
        input_kind: ``"latent"`` (paper default: upsampler, no VAE decode) or
            ``"pixel"`` (ablation: caller passes VAE-decoded frames in [-1, 1]).
        temporal_heads: False drops the temporal heads, so each frame is judged as
            an independent image (MCM's frame-sparse image discriminator).

    ``forward(video)`` with ``video`` of shape ``(B, F, C, h, w)`` returns ``(B, K)``
    logits, ``K = heads * len(layer_indices) * F * hp * wp`` with ``heads`` 2 (1
    without temporal heads); see ``split_logits``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer_indices: Sequence[int] | None = None,
        latent_channels: int = 4,
        upscale: int = 4,
        image_size: int | Sequence[int] = 224,
        head_channels: int = 64,
        input_kind: Literal["latent", "pixel"] = "latent",
        temporal_heads: bool = True,
    ):
        super().__init__()
        config = backbone.config
        if input_kind not in ("latent", "pixel"):
            raise ValueError(f"input_kind must be 'latent' or 'pixel', got {input_kind!r}")
        num_layers = int(config.num_hidden_layers)
        patch_h, patch_w = _pair(config.patch_size)
        img_h, img_w = _pair(image_size)
        if img_h <= 0 or img_w <= 0 or img_h % patch_h or img_w % patch_w:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of the backbone patch size "
                f"{config.patch_size} (e.g. {patch_h * 16})"
            )
        if layer_indices is None:
            layers = default_layer_indices(num_layers)
        else:
            layers = [int(i) for i in layer_indices]
            if not layers:
                raise ValueError("layer_indices must not be empty")
            bad = [i for i in layers if not 1 <= i <= num_layers]
            if bad:
                raise ValueError(
                    f"layer indices {bad} out of range: they are 1-based indices into the backbone's "
                    f"hidden_states (0 is the embedding output), valid range is 1..{num_layers}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"layer_indices contains duplicates: {layers}")
        if int(getattr(config, "num_channels", 3)) != 3:
            raise ValueError(f"backbone must take 3 input channels, got {config.num_channels}")

        self.input_kind = input_kind
        self.layer_indices: list[int] = layers
        self.image_size = (img_h, img_w)
        self.patch_size = (patch_h, patch_w)
        self.grid_size = (img_h // patch_h, img_w // patch_w)
        self.latent_channels = latent_channels
        self.feature_dim = int(config.hidden_size)

        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()

        self.upsampler = (
            LatentUpsampler(latent_channels, out_channels=3, upscale=upscale) if input_kind == "latent" else None
        )
        self.heads = DiscriminatorHeads(self.feature_dim, len(layers), head_channels, temporal=temporal_heads)
        self.heads_per_layer = 2 if temporal_heads else 1
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- modes / parameters ------------------------------------------------------------
    def train(self, mode: bool = True) -> "LatentVideoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen backbone: no dropout / drop-path, ever
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Upsampler (latent mode) + heads parameters; never the backbone's."""
        params = list(self.heads.parameters())
        if self.upsampler is not None:
            params = list(self.upsampler.parameters()) + params
        return params

    def _is_trainable_key(self, key: str) -> bool:
        return key.startswith("upsampler.") or key.startswith("heads.")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """``state_dict`` minus the frozen backbone (what checkpoints save)."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load upsampler + heads weights; strict on exactly the trainable keys."""
        expected = set(self.trainable_state_dict().keys())
        got = set(sd.keys())
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"trainable state dict mismatch: missing keys {missing}, unexpected keys {unexpected}"
            )
        self.load_state_dict(sd, strict=False)

    # -- forward -----------------------------------------------------------------------
    def num_logits(self, num_frames: int) -> int:
        hp, wp = self.grid_size
        return self.heads_per_layer * len(self.layer_indices) * num_frames * hp * wp

    def split_logits(self, logits: Tensor, num_frames: int) -> dict[str, Tensor]:
        """``(B, K)`` -> ``{"spatial/L": (B, F, hp, wp), "temporal/L": ...}`` for each layer L (no
        "temporal/L" without temporal heads)."""
        hp, wp = self.grid_size
        n = num_frames * hp * wp
        if logits.shape[1] != self.num_logits(num_frames):
            raise ValueError(f"expected {self.num_logits(num_frames)} logits, got {logits.shape[1]}")
        out: dict[str, Tensor] = {}
        chunks = logits.split(n, dim=1)
        k = self.heads_per_layer
        for j, layer in enumerate(self.layer_indices):
            out[f"spatial/{layer}"] = chunks[k * j].reshape(-1, num_frames, hp, wp)
            if k == 2:
                out[f"temporal/{layer}"] = chunks[k * j + 1].reshape(-1, num_frames, hp, wp)
        return out

    def preprocess(self, frames: Tensor) -> Tensor:
        """``(N, C, h, w)`` frames -> ``(N, 3, H, W)`` backbone input at ``image_size``."""
        if self.input_kind == "latent":
            x = self.upsampler(frames)
            if tuple(x.shape[-2:]) != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
            return x
        x = frames
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
        x = (x + 1.0) * 0.5  # [-1, 1] -> [0, 1]
        mean = self.pixel_mean.to(x.dtype)
        std = self.pixel_std.to(x.dtype)
        return (x - mean) / std

    def features(self, pixel_values: Tensor) -> list[Tensor]:
        """Backbone patch maps ``(N, C, hp, wp)`` for each selected layer (CLS/registers dropped).

        Runs the embeddings and the transformer blocks directly, up to the deepest selected layer: the same
        tensors as ``hidden_states`` of ``output_hidden_states=True``, without the blocks after the last one
        used and without transformers' output-capturing hooks (which torch.compile cannot trace)."""
        hidden = self.backbone.embeddings(pixel_values)
        hp, wp = self.grid_size
        n_patch = hp * wp
        prefix = hidden.shape[1] - n_patch  # CLS (+ register tokens)
        if prefix < 0:
            raise RuntimeError(f"backbone returned {hidden.shape[1]} tokens for a {hp}x{wp} patch grid")
        feats: dict[int, Tensor] = {}
        for i, layer in enumerate(self.backbone.encoder.layer[: max(self.layer_indices)], start=1):
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
            if i in self.layer_indices:
                tok = hidden[:, prefix:]
                feats[i] = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], hp, wp)
        return [feats[i] for i in self.layer_indices]

    def forward(self, video_bfchw: Tensor) -> Tensor:
        features = self.video_features(video_bfchw)
        return self.heads(features, *video_bfchw.shape[:2])

    def video_features(self, video_bfchw: Tensor) -> list[Tensor]:
        """The heads' input: per selected layer, backbone patch maps ``(B*F, C, hp, wp)`` in the heads' dtype
        (gradient penalties on features differentiate the heads with respect to these)."""
        if video_bfchw.dim() != 5:
            raise ValueError(f"expected a (B, F, C, h, w) video, got shape {tuple(video_bfchw.shape)}")
        b, f, c = video_bfchw.shape[:3]
        want_c = self.latent_channels if self.input_kind == "latent" else 3
        if c != want_c:
            raise ValueError(f"{self.input_kind} mode expects {want_c} channels, got {c}")
        frames = video_bfchw.reshape(b * f, *video_bfchw.shape[2:])
        x = self.preprocess(frames)
        backbone_dtype = next(self.backbone.parameters()).dtype
        feats = self.features(x.to(backbone_dtype))
        head_dtype = next(self.heads.parameters()).dtype
        return [t.to(head_dtype) for t in feats]


# --------------------------------------------------------------------------------------
# Backbone construction
# --------------------------------------------------------------------------------------
_PRESETS: dict[str, dict] = {
    # Tiny random backbone for CPU tests (intermediate size 64 = hidden 32 * mlp_ratio 2).
    "tiny": dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=32
    ),
    # facebook/dinov2-small architecture (ViT-S/14); position embeddings are for 518px
    # and get bicubically interpolated to the actual grid by Dinov2Embeddings.
    "svd-xt": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_swiglu_ffn=False,
    ),
}


def build_dinov2(name_or_path: str | None, preset: str = "svd-xt"):
    """Return a ``transformers.Dinov2Model``.

    ``name_or_path`` given: load pretrained weights (local folder or hub id). Otherwise
    random init from the ``preset`` architecture (``"tiny"`` or ``"svd-xt"``).
    """
    from transformers import Dinov2Config, Dinov2Model

    if name_or_path:
        try:
            return Dinov2Model.from_pretrained(name_or_path)
        except OSError as e:
            raise ValueError(
                f"could not load DINOv2 weights from {name_or_path}: pass a local folder with config.json "
                f"and weights, or a hub id reachable from this machine"
            ) from e
    if preset not in _PRESETS:
        raise ValueError(f"unknown DINOv2 preset {preset!r}; choose one of {sorted(_PRESETS)}")
    return Dinov2Model(Dinov2Config(**_PRESETS[preset]))


def build_discriminator(cfg, models, temporal_heads: bool = True) -> LatentVideoDiscriminator:
    """The discriminator that a training config asks for: DINOv2 (``cfg.dino``, else the random architecture
    of ``cfg.preset``) frozen in the models' dtype, with an fp32 trainable upsampler and heads of
    ``cfg.disc_head_channels``, reading latents or decoded frames (``cfg.disc_input``). Shared by OSV (video
    heads) and MCM (``temporal_heads=False``: an image discriminator)."""
    from prodistill.models.presets import get_preset

    backbone = build_dinov2(cfg.dino, cfg.preset).to(models.device, models.dtype)
    disc = LatentVideoDiscriminator(
        backbone,
        latent_channels=models.latent_channels,
        upscale=cfg.disc_upscale,
        image_size=get_preset(cfg.preset).disc_image_size,
        head_channels=cfg.disc_head_channels,
        input_kind="latent" if cfg.disc_input == "latent" else "pixel",
        temporal_heads=temporal_heads,
    ).to(models.device)
    for p in disc.trainable_parameters():
        p.data = p.data.float()
    return disc
