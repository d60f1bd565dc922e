"""The contract between a distillation method and the trainer.

A method declares its optimiser *phases* (e.g. generator then discriminator), the parameters each phase
updates, and computes one phase's loss on one micro-batch. The trainer does everything else: accumulation,
clipping, optimiser and LR-schedule steps, logging, checkpoints, resume. Loss terms are returned as tensors
(never `.item()`), so a step has no host synchronisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prodistill.diffusion.solvers import ConditionalDenoiser


class DistillationModels(Protocol):
    """What a method needs from "the models": `SVDModels` for real video, and the analytic benchmark's
    closed-form teacher, so the same method code runs on both. Conditions support `.cat` and
    `.unconditional()` (c_zero for CFG)."""

    teacher: nn.Module
    latent_channels: int
    device: torch.device
    dtype: torch.dtype

    def prepare_batch(self, batch: dict, fps: float, generator: torch.Generator) -> tuple[Tensor, Any]:
        """A data batch → (clean latents x0 (B, F, C, h, w), condition)."""

    def make_student(self, cfg, stage: int) -> nn.Module:
        """The student network for `stage`, its trainable parameters marked requires_grad."""

    def denoiser(self, net: nn.Module) -> ConditionalDenoiser:
        """D(x, σ, cond) of `net` (teacher or student)."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → pixels (B, F, 3, H, W) in [−1, 1] (previews; the decoded-discriminator ablation)."""

    def decode_with_grad(self, latents: Tensor) -> Tensor: ...

    # -- AVDM2's needs ----------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int, width: int, height: int) -> tuple[int, ...]: ...

    def encoder_features(self, x: Tensor, sigma: Tensor, cond) -> list[Tensor]:
        """The frozen teacher encoder's features of noisy latents at σ (B,), one (B, F, C_s, h_s, w_s) per
        resolution, finest first (the discriminator's backbone)."""

    def encoder_channels(self, height: int, width: int) -> list[int]:
        """C_s of `encoder_features` for latents of h×w."""

    def image_teacher(self, path: str | None = None) -> Any:
        """The 2D teacher (`prodistill.models.image_teacher`): `net`, `make_fake(cfg)`, `denoiser(net)`."""


@dataclass
class StepOutput:
    loss: Tensor
    """Scalar to backpropagate for this phase and micro-batch."""
    logs: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars to log (loss terms, logits)."""
    cache: dict[str, Tensor] = field(default_factory=dict)
    """Tensors a later phase of the same step reuses for this micro-batch (e.g. generated samples)."""


class Method:
    """Base class: subclasses set `phases` and implement `parameters`, `compute` and the weight I/O.

    A method calls its networks through attributes that `prodistill.accel` may replace by compiled or graphed
    stand-ins of the same signature, so a method holding one calls it through the attribute: `teacher_solve(x, path,
    cond, guidance)` (the frozen teacher's guided solve), `student_d(x, σ, cond)` (the student's denoiser), `ema_d(x,
    σ, cond)` (the EMA target's) and `disc_logits(x)` (the discriminator's logits, autocast entered inside)."""

    name: str = "method"
    phases: tuple[str, ...] = ("generator",)
    consistency: bool = True
    """The student's clean estimate is the consistency function f_θ = c_skip·x + c_out·D_θ (OSV eq. 4); False:
    D_θ itself, a few-step generator (AVDM2). The samplers take it from here."""

    @classmethod
    def check(cls, cfg) -> None:
        """Cheap checks of what the method reads besides the models and the training data (e.g. a folder of
        images), run by `prodistill train` before any model is built: raise a ValueError that says what to fix."""

    @classmethod
    def default_sample_steps(cls, cfg) -> int:
        """Steps `prodistill sample` uses when none are given."""
        return 1

    def parameters(self, phase: str) -> list[nn.Parameter] | list[dict]:
        """What `phase`'s optimiser updates: parameters, or torch parameter groups (dicts with "params") whose
        own "lr" or "weight_decay" override the trainer's for that group."""
        raise NotImplementedError

    def updates_per_step(self, phase: str) -> int:
        """Optimiser steps of `phase` per training step (a two-timescale GAN updates its critics more often).

        A step runs in rounds: round r updates, in `phases` order, every phase with more than r updates, so
        updates 2 and 1 for (generator, critic) run generator, critic, critic."""
        return 1

    def begin_round(self, index: int) -> None:
        """Called before round `index` of every step (see `updates_per_step`)."""

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        """Loss of `phase` on one micro-batch; `cache` holds what earlier phases and rounds of this step
        stored for it."""
        raise NotImplementedError

    def after_optimizer_step(self, phase: str) -> None:
        """Called after each optimiser step of `phase` (e.g. the EMA update)."""

    def weights(self) -> dict[str, dict[str, Tensor]]:
        """Trainable state as named groups of tensors (each group becomes one safetensors file)."""
        raise NotImplementedError

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        """Switch the method's trainable modules between train and eval mode."""

    @torch.no_grad()
    def preview(self, batch: dict, generator: torch.Generator) -> Tensor:
        """A generation (pixels (B, F, 3, H, W) in [−1, 1]) from `batch`'s first frames, for a video; draws
        only from `generator`, so previews never change the training's random stream."""
        raise NotImplementedError
