"""A tiny temporal VAE decoder, distilled from the teacher's full decoder (`prodistill train-decoder`).

Once the student runs one step, SVD's temporal VAE decoder is most of a generation (measured on an H200 at
14×576×1024: UNet 0.23 s, decode 1.36 s eager). This decoder maps the same scaled latents (B, F, 4, h, w) to
frames (B, F, 3, 8h, 8w) with convolutions only, so it exports to ONNX/TensorRT as plain Conv/Relu/Resize:

    conv 3×3 (4 → C₀) → per stage s: [residual block, temporal mix] × `blocks`, then ×2 nearest upsample +
    conv 3×3 (C_s → C_{s+1}) for the first three stages → conv 3×3 (→ 3)

A residual block is conv-ReLU-conv plus the input. The temporal mix lets each frame see its neighbours, so the
decoder does not flicker: y_t = x_t + W·[x_{t−1}, x_t, x_{t+1}] (1×1 conv over the three frames' channels, edge
frames repeated), written with slicing and concatenation only. With the default widths (64, 64, 64, 32) it has
about 0.5 M parameters (the issue allows a few million).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

CONFIG_FILE = "tiny_decoder.json"
WEIGHTS_FILE = "tiny_decoder.safetensors"


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class TemporalMix(nn.Module):
    """y_t = x_t + W·[x_{t−1}, x_t, x_{t+1}] over frames folded in the batch as (B·F, C, h, w)."""

    def __init__(self, channels: int, frames: int):
        super().__init__()
        self.frames = frames
        self.mix = nn.Conv2d(3 * channels, channels, 1)
        nn.init.zeros_(self.mix.weight)  # starts as the identity: a per-frame decoder
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: Tensor) -> Tensor:
        bf, c, h, w = x.shape
        v = x.reshape(bf // self.frames, self.frames, c, h, w)
        prev = torch.cat([v[:, :1], v[:, :-1]], dim=1)
        nxt = torch.cat([v[:, 1:], v[:, -1:]], dim=1)
        return x + self.mix(torch.cat([prev, v, nxt], dim=2).reshape(bf, 3 * c, h, w))


class TinyTemporalDecoder(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (64, 64, 64, 32), frames: int = 14, latent_channels: int = 4,
                 blocks: int = 1):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"a tiny decoder has 4 stages (8× upsampling): give 4 widths, got {channels}")
        self.config = {"channels": list(channels), "frames": frames, "latent_channels": latent_channels,
                       "blocks": blocks}
        self.frames = frames
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        stages = []
        for s, width in enumerate(channels):
            layers: list[nn.Module] = []
            for _ in range(blocks):
                layers += [ResBlock(width), TemporalMix(width, frames)]
            if s < len(channels) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, channels[s + 1], 3, padding=1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.conv_out = nn.Sequential(nn.ReLU(), nn.Conv2d(channels[-1], 3, 3, padding=1))

    def forward(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, F, 4, h, w) → frames (B, F, 3, 8h, 8w), unclamped (≈ [−1, 1])."""
        b, f = latents.shape[:2]
        if f != self.frames:
            raise ValueError(f"this tiny decoder was built for {self.frames} frames, got {f}")
        x = self.conv_out(self.stages(self.conv_in(latents.flatten(0, 1))))
        return x.unflatten(0, (b, f))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> "TinyTemporalDecoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} holds no tiny decoder ({CONFIG_FILE} missing): pass the folder that "
                             "`prodistill train-decoder` wrote (its RUN/decoder)")
        decoder = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        decoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return decoder.to(device).eval()


def parse_channels(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"--decoder-channels {text!r}: give 4 positive widths, e.g. 64,64,64,32")
    return widths
