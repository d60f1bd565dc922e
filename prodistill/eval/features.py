"""Feature extractors of `prodistill eval`: a video network for FVD and CLIP image embeddings.

FVD's standard extractor is the Kinetics-400 I3D network as the TorchScript file used by StyleGAN-V and the
papers after it (`i3d_torchscript.pt`): called as `net(videos, rescale=False, resize=False,
return_features=True)` on (B, 3, T, 224, 224) videos in [−1, 1], it returns the 400 logits before the softmax,
the features FVD is computed on. `--i3d FILE` loads it from a local file; nothing is downloaded. Without it a
tiny random-init 3D conv network with the same call stands in (fixed seed, so two runs agree): the whole
evaluation runs, but its "FVD" is comparable only to other runs with the stand-in, never to published figures.

CLIP: by default the teacher's own image encoder (SVD's conditioning encoder is OpenAI's CLIP ViT-H/14 image
tower with projection), so no extra weights are needed; `--clip DIR` takes any transformers
`CLIPVisionModelWithProjection` folder instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyVideoNet(nn.Module):
    """The random-init stand-in for I3D: three strided 3D convolutions and a global average, 64 features."""

    size = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
                                     nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.GELU(),
                                     nn.Conv3d(32, 64, 3, stride=2, padding=1))

    def forward(self, videos: Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> Tensor:
        return self.net(videos).mean(dim=(2, 3, 4))


class VideoFeatures:
    """Videos (B, F, 3, H, W) in [−1, 1] → features (B, D) as float64 numpy."""

    def __init__(self, net: nn.Module, size: int, name: str, standard: bool, device: torch.device):
        self.net, self.size, self.name, self.standard, self.device = net, size, name, standard, device

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> np.ndarray:
        b, f = videos.shape[:2]
        x = F.interpolate(videos.flatten(0, 1).float().to(self.device), size=(self.size, self.size),
                          mode="bilinear", align_corners=False, antialias=True)
        x = x.unflatten(0, (b, f)).transpose(1, 2).contiguous()  # (B, 3, T, S, S)
        out = self.net(x, rescale=False, resize=False, return_features=True)
        return out.float().flatten(1).cpu().numpy().astype(np.float64)


def check_i3d(path: str | Path, flag: str = "--i3d") -> Path:
    """The I3D file `path`, which must exist (one sentence otherwise; `flag` names the option)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{flag} {path}: no such file; put the I3D TorchScript file of FVD (i3d_torchscript.pt, "
                         f"as used by StyleGAN-V) there, or leave {flag} out to run with a random-init stand-in")
    return file


def load_video_features(path: str | Path | None, device: torch.device) -> VideoFeatures:
    """I3D from a local TorchScript file, or the random-init stand-in when `path` is None."""
    if path is None:
        net = TinyVideoNet().to(device).eval()
        return VideoFeatures(net, TinyVideoNet.size, "tiny random-init stand-in (not I3D)", False, device)
    file = check_i3d(path)
    try:
        net = torch.jit.load(str(file), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--i3d {path} is not a TorchScript file ({str(e).splitlines()[0][:120]}); pass the I3D "
                         "TorchScript file of FVD (i3d_torchscript.pt)") from e
    return VideoFeatures(net, 224, f"I3D ({file.name})", True, device)


class ClipEmbeddings:
    """Frames (N, 3, H, W) in [−1, 1] → unit-length CLIP image embeddings (N, D), float32 on the CPU."""

    def __init__(self, embed, name: str, chunk: int = 16):
        self.embed, self.name, self.chunk = embed, name, chunk

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor:
        out = [self.embed(frames[i : i + self.chunk]).float().cpu() for i in range(0, len(frames), self.chunk)]
        return F.normalize(torch.cat(out).flatten(1), dim=-1)


def check_clip_folder(path: str | Path) -> Path:
    """The CLIP folder `path`, which must hold a transformers config (one sentence otherwise)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--clip {path}: not a transformers model folder (no config.json); pass a "
                         "CLIPVisionModelWithProjection folder saved with save_pretrained, or leave --clip out to "
                         "use the teacher's image encoder")
    return folder


def load_clip(path: str | Path | None, models) -> ClipEmbeddings:
    """The teacher's image encoder (`path` None) or a local transformers CLIP vision folder."""
    if path is None:
        return ClipEmbeddings(lambda x: models.encode_image_embeds(x.to(models.device)), "the teacher's image encoder")
    folder = check_clip_folder(path)
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder).to(models.device).eval()
    size = model.config.image_size

    def embed(x: Tensor) -> Tensor:
        x = F.interpolate(x.float().to(models.device), size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True)
        x = ((x + 1) / 2 - models.clip_mean.to(x.device)) / models.clip_std.to(x.device)
        return model(pixel_values=x).image_embeds

    return ClipEmbeddings(embed, f"CLIP ({folder.name})")


def clip_scores(frames: Tensor, cond_image: Tensor, clip: ClipEmbeddings) -> tuple[float, float]:
    """(mean cosine similarity of frames 1..F−1 to the conditioning image, mean cosine similarity of neighbouring
    frames) of one video (F, 3, H, W) in [−1, 1]; `cond_image` (3, H, W)."""
    e = clip(torch.cat([cond_image[None], frames]))
    cond, video = e[0], e[1:]
    to_cond = (video[1:] @ cond).mean().item()
    neighbours = (video[1:] * video[:-1]).sum(-1).mean().item()
    return to_cond, neighbours
