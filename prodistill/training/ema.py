"""Exponential moving average of a set of named parameters: the consistency target θ⁻ (OSV eq. 9-10).

Only the trainable tensors are averaged (LoRA and any trained modules); the frozen rest is shared with the
student, so the EMA network is evaluated as the student itself with the averaged values copied into its
parameters for the call (`swapped`). Copying values in place keeps the parameter objects *and their storage*
that compiled regions, CUDA graphs and optimisers hold, so the EMA forward runs the student's own compiled
code with none of `functional_call`'s per-call re-parametrisation; the price is one spare copy of the
trainable tensors and three in-place copies of them per call (for LoRA, a small fraction of the network).

Under FSDP (`--parallel fsdp`) the parameters are sharded DTensors: the EMA then holds the same shards and works
on each rank's local shard (`_local`), which is both correct (the update is element-wise) and what the foreach
kernels accept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._live = params
        self.params: dict[str, Tensor] = {k: p.detach().clone() for k, p in params.items()}
        self._saved: list[Tensor] | None = None  # θ while θ⁻ is swapped in (allocated on first use)

    @torch.no_grad()
    def update(self) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ."""
        ema, live = [_local(t) for t in self.params.values()], [_local(p.detach()) for p in self._live.values()]
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the live parameters hold θ⁻; θ is restored on exit, even on error. Use it without
        gradient (autograd must not save the swapped values)."""
        live = [_local(p.detach()) for p in self._live.values()]
        if self._saved is None:
            self._saved = [t.clone() for t in live]
        with torch.no_grad():
            torch._foreach_copy_(self._saved, live)
            torch._foreach_copy_(live, [_local(t) for t in self.params.values()])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, self._saved)

    def wrap(self, fn: Callable) -> Callable:
        """`fn` (e.g. the student's denoiser) evaluated with θ⁻ swapped in: the EMA target f_θ⁻."""

        def with_ema(*args, **kwargs):
            with self.swapped():
                return fn(*args, **kwargs)

        return with_ema

    def state_dict(self) -> dict[str, Tensor]:
        return self.params

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state[k])


def _local(t: Tensor) -> Tensor:
    """A sharded DTensor's local shard (same storage), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t
