"""Distances and adversarial losses used by the methods."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Per-sample pseudo-Huber distance d(x, y) = √(‖x − y‖₂² + c²) − c (OSV eq. 7/10, after iCT); shape (B,).
    With the fused ops switched on (`--fused-ops`, see `ops`), CUDA tensors take the fused kernel."""
    if x.is_cuda:
        import ops

        if ops.use_fused(x, None):
            return ops.pseudo_huber(x, y, c)
    sq = (x - y).float().pow(2).flatten(1).sum(1)
    return (sq + c * c).sqrt() - c


def default_huber_c(numel_per_sample: int) -> float:
    """iCT's choice c = 0.00054·√d for d-dimensional samples (the OSV appendix's value is not legible)."""
    return 0.00054 * math.sqrt(numel_per_sample)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss ReLU(1 − D(real)) + ReLU(1 + D(fake)), averaged (OSV eq. 6 and 9)."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator adversarial term ReLU(1 − D(fake)), averaged (OSV eq. 7 and 10, before λ)."""
    return F.relu(1.0 - fake_logits.float()).mean()


def logistic_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator logistic loss −log σ(D(real)) − log(1 − σ(D(fake))) = softplus(−D(real)) + softplus(D(fake)),
    averaged: the GAN objective maximised over D, negated (AVDM2 eq. 5-6)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def logistic_g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss −log σ(D(fake)) = softplus(−D(fake)), averaged (AVDM2 eq. 7, whose
    "E[log D]" is the quantity the generator raises)."""
    return F.softplus(-fake_logits.float()).mean()


def critic_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator adversarial term −D(fake), averaged (MCM eq. 4; the generator side of both its hinge and its
    WGAN discriminator)."""
    return -fake_logits.float().mean()


def clipped_wgan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """WGAN critic loss −D(real) + D(fake) with each logit's term floored at −1, averaged: the loss of MCM's
    released training scripts (`--disc_loss_type wgan`); the floor keeps the critic's logits bounded."""
    return (-real_logits.float()).clamp(min=-1.0).mean() + fake_logits.float().clamp(min=-1.0).mean()


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of per-sample values, optionally weighted per sample (λ(t_n) of OSV eq. 10)."""
    return values.mean() if weights is None else (values * weights.to(values)).mean()


__all__ = ["pseudo_huber", "default_huber_c", "hinge_d_loss", "hinge_g_loss", "logistic_d_loss", "logistic_g_loss",
           "critic_g_loss", "clipped_wgan_d_loss", "weighted_mean"]
