"""AVDM2's video discriminator head: trainable convolutions on the frozen teacher encoder's multi-scale features.

AVDM2 §4.1 (after SDXL-Lightning): the discriminator is the video teacher's UNet encoder, frozen, reading the
noisy video x_t at its noise level, plus a trainable head that "extracts features from three spatial scales,
processes each through independent convolutional layers, and then concatenates these features; a final
convolutional layer transforms the aggregated features into the discriminator's logit". The paper gives no
layer sizes; here each branch is conv3×3 → SiLU → conv3×3 → SiLU at `width` channels, average-pooled to the
coarsest scale, and the final layer is a 1×1 conv to one channel whose map is averaged over positions and
frames: one logit per video. No normalisation layer: a per-group norm over the few positions of a coarse
scale (1×1 at the bottom of a small latent) would erase exactly the magnitudes a fake must be judged by. The encoder is whatever `encoder_features` of the models gives
(the SVD UNet's down blocks and mid block; a parameter-free stand-in on the analytic benchmark), so this
module holds only the trainable part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiScaleHead(nn.Module):
    def __init__(self, channels: Sequence[int], width: int):
        """`channels`: channels of each encoder scale, finest first; `width`: channels of every branch."""
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                          nn.SiLU())
            for c in channels
        )
        self.out = nn.Conv2d(width * len(channels), 1, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Encoder features, each (B, F, C_s, h_s, w_s), finest first → logits (B,) (fp32)."""
        if len(features) != len(self.branches):
            raise ValueError(f"the head was built for {len(self.branches)} encoder scales, got {len(features)}")
        b, f = features[0].shape[:2]
        size = features[-1].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(branch(x.flatten(0, 1).float()), size)
                  for branch, x in zip(self.branches, features)]
        logit_map = self.out(torch.cat(pooled, dim=1))  # (B·F, 1, h, w)
        return logit_map.flatten(1).mean(1).view(b, f).mean(1)
