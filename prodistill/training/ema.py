"""Exponential moving average of a set of named parameters: the consistency target θ⁻ (OSV eq. 9-10).

Only the trainable tensors are averaged (LoRA and any trained modules); the frozen rest is shared with the
student, so the EMA network is evaluated as the student with these tensors swapped in (`functional_call`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._live = params
        self.params: dict[str, Tensor] = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ."""
        ema, live = list(self.params.values()), [p.detach() for p in self._live.values()]
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.params

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state[k])
