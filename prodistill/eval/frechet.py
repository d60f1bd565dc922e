"""The Fréchet distance between two Gaussians fitted to feature sets (FID/FVD), and the cached statistics.

d²(N(μ₁, Σ₁), N(μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

(Fréchet 1957; Dowson & Landau 1982; used as FID by Heusel et al. 2017 and as FVD by Unterthiner et al. 2018).
The cross term is computed from the symmetric positive semi-definite matrix Σ₁^½ Σ₂ Σ₁^½ with `numpy.linalg.eigh`
— the same value as tr (Σ₁Σ₂)^½, which the usual `scipy.linalg.sqrtm` route computes through a non-symmetric
Schur decomposition that can return complex noise for rank-deficient covariances (few videos, wide features).
Written here rather than taken from an FVD package: the ones on PyPI download their network at run time or need
torchvision, and this is ten lines of linear algebra with a closed-form test.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prodistill.atomic import atomic_temp


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise in its
    eigenvalues is clipped to 0)."""
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set, with what produced it (checked before two are compared)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, features: np.ndarray, meta: dict | None = None) -> "GaussianStats":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"feature statistics need at least 2 feature vectors, got shape {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False), len(x), dict(meta or {}))

    def save(self, path: str | Path) -> Path:
        """Written beside `path`, then renamed: an interrupted save leaves no truncated file to be read next time."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_temp(path)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count, meta=json.dumps(self.meta))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "GaussianStats":
        try:
            with np.load(path) as z:
                return cls(z["mu"], z["sigma"], int(z["count"]), json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"--real-stats {path} is not a statistics file written by `prodistill eval` ({e}); "
                             "delete it to have it computed again") from e


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """d² between the Gaussians of `a` and `b` (the formula in this module's docstring); ≥ 0 up to rounding."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): statistics of different "
                         "extractors cannot be compared")
    root = sqrtm_psd(a.sigma)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ b.sigma @ root), 0, None)).sum()
    d2 = float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)
    return max(d2, 0.0)
