"""Motion representations M(·) of MCM's disentangled motion consistency distillation (MCM eq. 6).

MCM applies the consistency loss to M(f_θ(x_t, t)) and M(f_θ⁻(x̂^φ_{t−s}, t−s)) instead of the raw latents,
so that the frames' appearance is left to the image discriminator. The paper compares five choices (its
Table 5); each is a function of video latents (B, F, C, h, w) here:

- `diff`: latent difference of consecutive frames, x_{f+1} − x_f → (B, F−1, C, h, w);
- `corr`: latent correlation, the global cost volume ⟨x_f[:, p], x_{f+1}[:, q]⟩/√C between every pair of
  positions p, q of consecutive frames → (B, F−1, h·w, h·w) (quadratic in h·w: 8.5e7 values per frame pair
  at 1024×576, so mind the memory);
- `lowfreq` / `highfreq`: the low / high space-time frequencies of each channel, through the Butterworth
  low-pass filter of FreeInit (order 4, normalised stop frequency 0.25 in time and space) that the authors'
  code uses; high = x − low, which equals filtering with 1 − the low-pass mask (the FFT is linear);
- `learned` (the default and the paper's best): `MotionHead`, a per-frame residual MLP over the latent
  channels; the prediction goes through the head, the target through its EMA copy, and the head is dropped
  at inference.

`raw` (M = identity: LCM's loss on latents plus the discriminator, the first row of Table 5) is offered too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOWPASS_ORDER = 4
"""Order n of the Butterworth low-pass filter 1/(1 + (d²/s²)ⁿ) (FreeInit's default, used by the authors)."""
LOWPASS_STOP = 0.25
"""Normalised stop frequency s, in space and in time (FreeInit's default, used by the authors)."""


def latent_difference(x: Tensor) -> Tensor:
    """x_{f+1} − x_f for latents (B, F, C, h, w) → (B, F−1, C, h, w)."""
    return x[:, 1:] - x[:, :-1]


def latent_correlation(x: Tensor) -> Tensor:
    """Global correlation of consecutive frames, Σ_c x_f[c, p]·x_{f+1}[c, q]/√C → (B, F−1, h·w, h·w)."""
    c = x.shape[2]
    prev, nxt = x[:, :-1].flatten(3), x[:, 1:].flatten(3)  # (B, F−1, C, h·w)
    return torch.einsum("bfcp,bfcq->bfpq", prev, nxt) / math.sqrt(c)


def lowpass_mask(frames: int, height: int, width: int, device=None) -> Tensor:
    """FreeInit's Butterworth low-pass mask 1/(1 + (d²/s²)ⁿ) in torch.fft's (unshifted) layout, (F, 1, h, w).

    d² = f_t² + f_y² + f_x² with each frequency normalised to [−1, 1) (2·fftfreq); for even sizes these are
    exactly FreeInit's (2k/n − 1) after its fftshift, and for odd sizes the zero frequency still sits at d = 0.
    """
    ft, fy, fx = (2 * torch.fft.fftfreq(n, device=device, dtype=torch.float64) for n in (frames, height, width))
    d2 = ft[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2
    mask = 1.0 / (1.0 + (d2 / LOWPASS_STOP**2) ** LOWPASS_ORDER)
    return mask.float().unsqueeze(1)


def low_frequency(x: Tensor) -> Tensor:
    """Low space-time frequencies of each channel of latents (B, F, C, h, w), same shape."""
    b, f, c, h, w = x.shape
    spectrum = torch.fft.fftn(x.float(), dim=(1, 3, 4))
    return torch.fft.ifftn(spectrum * lowpass_mask(f, h, w, x.device), dim=(1, 3, 4)).real


def high_frequency(x: Tensor) -> Tensor:
    """High space-time frequencies of each channel: x − low_frequency(x)."""
    return x.float() - low_frequency(x)


def identity(x: Tensor) -> Tensor:
    return x


MOTION_REPRESENTATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "learned": identity,  # the head is applied by the method (student head / EMA head)
    "diff": latent_difference,
    "corr": latent_correlation,
    "lowfreq": low_frequency,
    "highfreq": high_frequency,
    "raw": identity,
}
"""`--motion-repr` name → the fixed part of M(·)."""


class MotionHead(nn.Module):
    """MCM's learnable motion representation: x + conv_out(SiLU(GN(conv_in(SiLU(x))))) on each frame.

    1×1 convolutions mix only the latent channels (C → hidden → C; no temporal or spatial mixing), GroupNorm
    has 32 groups, and conv_out starts at zero, so the head starts as the identity (M = raw latents). This
    is the authors' released `SpatialHead(num_layers=2, kernel_size=1)`, including its SiLU on the input.
    """

    def __init__(self, channels: int = 4, hidden: int = 64, groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, kernel_size=1)
        self.norm = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_bfchw: Tensor) -> Tensor:
        frames = x_bfchw.flatten(0, 1)
        residual = self.conv_out(F.silu(self.norm(self.conv_in(F.silu(frames)))))
        return x_bfchw + residual.view_as(x_bfchw)
