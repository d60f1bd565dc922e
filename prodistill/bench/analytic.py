"""A video-shaped Gaussian mixture whose exact denoiser is known in closed form, behind the models interface.

Why: a distillation method can only be judged against the distribution its teacher samples. With real SVD
that needs FVD on GPUs; here the data distribution is known exactly, the teacher is the *exact* denoiser
D(x, σ) = E[x0 | x0 + σ·ε = x], and generated samples can be compared with fresh exact samples. Every
solver, method and sampler of the package runs unchanged on it (`AnalyticModels` implements
`prodistill.methods.base.DistillationModels`).

The mixture. Latents are (F, C, h, w), flattened per frame to (F, M), M = C·h·w. Component k has
    x0 | k ~ N(μ_k, s_k²·(A ⊗ I_M)),   A_ij = ρ^|i−j|   (AR(1) correlation over frames),
and its mean morphs smoothly over the clip: μ_k[f] = a·(cos θ_f·P_k + sin θ_f·Q_k), θ_f from 0 to π/2.
Components belong to classes (the condition); the unconditional distribution is the full mixture, a
class's conditional is its own components, so CFG's two branches are both exact.

Exact denoiser. With A = U·diag(λ)·Uᵀ, the noisy marginal of component k is N(μ_k, (s_k²A + σ²I) ⊗ I_M),
diagonal in the rotated frame basis z = Uᵀ(x − μ_k):
    log p_σ(x | k) = −½ Σ_j [M·log(2π·v_kj) + ‖z_j‖²/v_kj],   v_kj = s_k²·λ_j + σ²
    E[x0 | x, k]  = μ_k + U·diag(s_k²λ_j / v_kj)·z
    D(x, σ)       = Σ_k p(k | x, σ, class)·E[x0 | x, k]          (posterior weights by softmax)
All of it in float64: O(K·F·M) per sample, exact at every σ of the grid.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prodistill.diffusion.edm import append_dims


@dataclass(frozen=True)
class MixtureSpec:
    """Shape and structure of the analytic video distribution."""

    frames: int = 4
    channels: int = 4
    height: int = 4
    width: int = 4
    classes: int = 4
    """Conditions (class labels); each owns `modes_per_class` components."""
    modes_per_class: int = 2
    frame_corr: float = 0.9
    """ρ of the AR(1) correlation of the within-component noise over frames."""
    mean_amplitude: float = 0.8
    """Per-element standard deviation of the component means."""
    spread: tuple[float, float] = (0.35, 0.6)
    """Range of the within-component standard deviations s_k (drawn uniformly)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.frames, self.channels, self.height, self.width)

    @property
    def components(self) -> int:
        return self.classes * self.modes_per_class


@dataclass
class ClassCondition:
    """The analytic benchmark's condition: a class label per sample; −1 is c_zero (unconditional)."""

    label: Tensor
    """(B,) int64."""

    def cat(self, other: "ClassCondition") -> "ClassCondition":
        return ClassCondition(torch.cat([self.label, other.label]))

    def unconditional(self) -> "ClassCondition":
        return ClassCondition(torch.full_like(self.label, -1))


class VideoGaussianMixture(nn.Module):
    """The data distribution and its exact denoiser; `forward(x, σ, cond)` is D(x, σ) (the teacher)."""

    def __init__(self, spec: MixtureSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(seed)
        k, (f, m) = spec.components, (spec.frames, spec.channels * spec.height * spec.width)
        theta = torch.linspace(0, math.pi / 2, f, dtype=torch.float64)
        p, q = (torch.randn(k, 1, m, generator=g, dtype=torch.float64) for _ in range(2))
        means = spec.mean_amplitude * (theta.cos()[:, None] * p + theta.sin()[:, None] * q)  # (K, F, M)
        lo, hi = spec.spread
        scales = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
        idx = torch.arange(f, dtype=torch.float64)
        corr = spec.frame_corr ** (idx[:, None] - idx[None, :]).abs()
        lam, u = torch.linalg.eigh(corr)
        self.register_buffer("means", means)
        self.register_buffer("variances", scales**2)  # s_k², (K,)
        self.register_buffer("log_weights", torch.full((k,), -math.log(k), dtype=torch.float64))
        self.register_buffer("component_class", torch.arange(k) // spec.modes_per_class)
        self.register_buffer("frame_eigvals", lam)  # λ (F,)
        self.register_buffer("frame_basis", u)  # U (F, F), columns = eigenvectors

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Exact samples x0 (B, F, C, h, w) float32 of the classes `labels` (B,), and their components (B,)."""
        b, per = labels.shape[0], self.spec.modes_per_class
        comp = labels * per + torch.randint(0, per, (b,), generator=generator)
        white = torch.randn(b, *self.means.shape[1:], generator=generator, dtype=torch.float64)
        root = self.frame_basis * self.frame_eigvals.sqrt()  # A = root·rootᵀ
        x = self.means[comp] + self.variances[comp].sqrt()[:, None, None] * torch.einsum("fj,bjm->bfm", root, white)
        return x.view(b, *self.spec.shape).float(), comp

    # -- exact densities and the denoiser -------------------------------------------------------------------
    def _rotated(self, x: Tensor) -> Tensor:
        """z = Uᵀ(x − μ_k) for every component: (B, K, F, M) float64."""
        flat = x.double().reshape(x.shape[0], self.spec.frames, -1)
        return torch.einsum("fj,bkfm->bkjm", self.frame_basis, flat[:, None] - self.means[None])

    def _noisy_terms(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z (B, K, F, M), v_kj = s_k²·λ_j + σ² (B, K, F), log p_σ(x | k) (B, K))."""
        z = self._rotated(x)
        v = self.variances[None, :, None] * self.frame_eigvals[None, None, :] + sigma.double().pow(2)[:, None, None]
        log_lik = -0.5 * (z.shape[-1] * (2 * math.pi * v).log() + z.pow(2).sum(-1) / v).sum(-1)
        return z, v, log_lik

    def component_log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log p_σ(x | k), (B, K), for x (B, F, C, h, w) and σ (B,) (σ = 0: the clean density)."""
        return self._noisy_terms(x, sigma)[2]

    def _log_prior(self, labels: Tensor | None, batch: int) -> Tensor:
        """log p(k | class), (B, K): the mixture weights, restricted to the class's components where label ≥ 0."""
        prior = self.log_weights.expand(batch, -1)
        if labels is None:
            return prior
        own = self.component_class[None, :] == labels[:, None]
        return torch.where((labels[:, None] < 0) | own, prior, torch.full_like(prior, -math.inf))

    def log_prob(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p_σ(x | class) (B,), class = all components where labels is None or −1."""
        log_prior = self._log_prior(labels, x.shape[0])
        return torch.logsumexp(self.component_log_prob(x, sigma) + log_prior, 1) - torch.logsumexp(log_prior, 1)

    def forward(self, x: Tensor, sigma: Tensor, cond: ClassCondition) -> Tensor:
        """The exact denoiser E[x0 | x0 + σ·ε = x, class] for x (B, F, C, h, w), σ (B,), as float32."""
        z, v, log_lik = self._noisy_terms(x, sigma)
        post = torch.softmax(log_lik + self._log_prior(cond.label, x.shape[0]), dim=1)  # p(k | x, σ, class)
        gain = self.variances[None, :, None] * self.frame_eigvals[None, None, :] / v  # (B, K, F)
        shrunk = torch.einsum("fj,bkjm->bkfm", self.frame_basis, gain[..., None] * z)
        x0 = torch.einsum("bk,bkfm->bfm", post, self.means[None] + shrunk)
        return x0.view(x.shape).to(x.dtype)

    def whitened_residual(self, x: Tensor, sigma: Tensor, cond: ClassCondition) -> Tensor:
        """Σ_k p(k | x, σ, class)·U·(z_kj/√v_kj): x's deviation from each component in that component's noisy
        whitened frame basis, posterior-weighted, back in frames — an internal quantity of the exact denoiser,
        ~N(0, I) per element for x drawn from the noisy marginal; (B, F, C, h, w) float32."""
        z, v, log_lik = self._noisy_terms(x, sigma)
        post = torch.softmax(log_lik + self._log_prior(cond.label, x.shape[0]), dim=1)
        white = torch.einsum("fj,bkjm->bkfm", self.frame_basis, z / v.sqrt()[..., None])
        return torch.einsum("bk,bkfm->bfm", post, white).view(x.shape).to(x.dtype)

    def frame_marginal(self) -> "VideoGaussianMixture":
        """The distribution of one frame taken at a uniformly random position of a clip of the same class: a
        mixture of K·F components N(μ_k[f], s_k²·I) (A_ff = 1), component k·F + f, so classes stay
        contiguous. Its exact denoiser is AVDM2's 2D teacher on this benchmark (frames = 1)."""
        k, f = self.spec.components, self.spec.frames
        marginal = VideoGaussianMixture(replace(self.spec, frames=1, modes_per_class=self.spec.modes_per_class * f))
        marginal.means = self.means.reshape(k * f, 1, -1).clone()
        marginal.variances = self.variances.repeat_interleave(f)
        marginal.log_weights = torch.full((k * f,), -math.log(k * f), dtype=torch.float64)
        marginal.component_class = self.component_class.repeat_interleave(f)
        marginal.frame_eigvals = torch.ones(1, dtype=torch.float64)
        marginal.frame_basis = torch.ones(1, 1, dtype=torch.float64)
        return marginal.requires_grad_(False).eval()

    # -- what the metrics need ------------------------------------------------------------------------------
    def assign(self, x: Tensor) -> Tensor:
        """Component of highest posterior under the clean mixture (B,)."""
        return (self.component_log_prob(x, x.new_zeros(x.shape[0])) + self.log_weights).argmax(1)

    def mahalanobis2(self, x: Tensor, comp: Tensor) -> Tensor:
        """Squared Mahalanobis distance of x to component `comp` under its clean covariance (B,)."""
        z = self._rotated(x)[torch.arange(x.shape[0]), comp]  # (B, F, M)
        v = self.variances[comp][:, None] * self.frame_eigvals[None, :]
        return (z.pow(2).sum(-1) / v).sum(-1)


class CorrectedDenoiser(nn.Module):
    """The analytic student: D_θ(x, σ, c) = D_teacher(x, σ, c) + c(σ)·g_θ(c_in·x, D_teacher, σ, c).

    g_θ is an MLP over the flattened latents and the teacher's output, with σ (Fourier features of ¼·ln σ)
    and the class (an embedding; c_zero has its own) added to its hidden layers. Its last layer starts at
    zero, so the student starts as the teacher — the role LoRA's zero-initialised B plays for the SVD
    student — and c(σ) = σ/√(σ²+1) (|c_out| of EDM) keeps corrections small where the teacher is near x.
    """

    def __init__(self, teacher: VideoGaussianMixture, hidden: int = 256, depth: int = 3, fourier: int = 16):
        super().__init__()
        self.teacher = teacher
        dim = math.prod(teacher.spec.shape)
        self.register_buffer("freqs", torch.arange(1, fourier + 1, dtype=torch.float32) * 0.5)
        self.inp = nn.Linear(2 * dim, hidden)
        self.cond = nn.Sequential(nn.Linear(2 * fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(teacher.spec.classes + 1, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, sigma: Tensor, cond: ClassCondition) -> Tensor:
        with torch.no_grad():
            base = self.teacher(x, sigma, cond)
        sigma = sigma.float()
        c_in = append_dims(1 / (sigma * sigma + 1).sqrt(), x.ndim)
        phase = 0.25 * sigma.log()[:, None] * self.freqs
        emb = self.cond(torch.cat([phase.sin(), phase.cos()], 1)) + self.label(cond.label + 1)
        h = F.silu(self.inp(torch.cat([(c_in * x).flatten(1), base.flatten(1)], 1)) + emb)
        for block in self.blocks:
            h = h + F.silu(block(h) + emb)
        scale = append_dims(sigma / (sigma * sigma + 1).sqrt(), x.ndim)
        return base + scale * self.out(h).view(x.shape)


class MixtureLoader:
    """Resumable stand-in for the clip loader: batches of exact samples {"latents", "label"}; batch i is a
    function of (seed, i) only, so a resumed run sees the same data."""

    def __init__(self, mixture: VideoGaussianMixture, batch_size: int, seed: int = 0):
        self.mixture, self.batch_size, self.seed, self.position = mixture, batch_size, seed, 0

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.position)
        self.position += 1
        labels = torch.randint(0, self.mixture.spec.classes, (self.batch_size,), generator=g)
        latents, _ = self.mixture.sample(labels, g)
        return {"latents": latents, "label": labels}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class AnalyticModels:
    """`DistillationModels` for the analytic benchmark: the exact mixture denoiser as the teacher and
    `CorrectedDenoiser` students, in fp32 on the CPU."""

    def __init__(self, mixture: VideoGaussianMixture, hidden: int = 256, depth: int = 3):
        self.mixture, self.hidden, self.depth = mixture, hidden, depth
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.latent_channels = mixture.spec.channels
        mixture.requires_grad_(False).eval()

    @property
    def teacher(self) -> nn.Module:
        return self.mixture

    def prepare_batch(self, batch: dict, fps: float, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, ClassCondition]:
        return batch["latents"].to(self.device), ClassCondition(batch["label"].to(self.device))

    def make_student(self, cfg, stage: int) -> nn.Module:
        """A fresh zero-correction student (equal to the teacher); its capacity is the benchmark's choice,
        the LoRA options of `cfg` are SVD's and do not apply."""
        return CorrectedDenoiser(self.mixture, self.hidden, self.depth)

    def denoiser(self, net: nn.Module):
        return lambda x, sigma, cond: net(x, sigma, cond)

    def latent_shape(self, batch: int, frames: int, width: int, height: int) -> tuple[int, ...]:
        """The mixture's clip shape (its frames and size are fixed by the spec; the arguments are SVD's)."""
        return (batch, *self.mixture.spec.shape)

    # -- AVDM2's teacher encoder and 2D teacher ------------------------------------------------------------
    def encoder_features(self, x: Tensor, sigma: Tensor, cond: ClassCondition) -> list[Tensor]:
        """A frozen, parameter-free stand-in for the teacher UNet's encoder (this teacher has none): the
        preconditioned input c_in·x, the exact teacher's D(x, σ) and its whitened residual (which, like the
        video UNet's temporal layers, mixes frames) stacked on channels, at full, half and quarter size
        (average pooling), each (B, F, 3C, h_s, w_s), finest first. Differentiable in x."""
        c_in = append_dims(1 / (sigma.float() ** 2 + 1).sqrt(), x.ndim)
        h = torch.cat([c_in * x, self.mixture(x, sigma, cond), self.mixture.whitened_residual(x, sigma, cond)],
                      dim=2)
        features = [h]
        while len(features) < 3 and min(h.shape[-2:]) > 1:
            h = F.avg_pool2d(h.flatten(0, 1), 2).unflatten(0, h.shape[:2])
            features.append(h)
        return features

    def encoder_channels(self, height: int, width: int) -> list[int]:
        """Channels of `encoder_features`' outputs (the latent size is the spec's; the arguments are SVD's)."""
        _, _, c, h, w = self.latent_shape(1, 1, width, height)
        scales, size = 1, min(h, w)
        while scales < 3 and size > 1:
            scales, size = scales + 1, size // 2
        return [3 * c] * scales

    def image_teacher(self, path: str | None = None) -> "AnalyticFrameTeacher":
        if path is not None:
            raise ValueError("--image-teacher does not apply to the analytic benchmark (its 2D teacher is exact)")
        return AnalyticFrameTeacher(self)

    def autocast(self):
        return contextlib.nullcontext()

    def decode_with_grad(self, latents: Tensor) -> Tensor:
        """A stand-in "decoder" for previews: the first three channels (repeated if fewer), 8× nearest
        upsampling, tanh. There is no VAE here; the benchmark's discriminator reads latents."""
        rgb = latents[:, :, [i % latents.shape[2] for i in range(3)]]
        return torch.tanh(rgb.repeat_interleave(8, -1).repeat_interleave(8, -2))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_with_grad(latents)


class AnalyticFrameTeacher:
    """AVDM2's 2D teacher on the analytic benchmark: the exact denoiser of the frame marginal
    (`VideoGaussianMixture.frame_marginal`); the fake is a zero-correction `CorrectedDenoiser` of it."""

    def __init__(self, models: AnalyticModels):
        self.models = models
        self.net = models.mixture.frame_marginal()

    def make_fake(self, cfg) -> nn.Module:
        return CorrectedDenoiser(self.net, self.models.hidden, self.models.depth)

    def denoiser(self, net: nn.Module):
        def d(x: Tensor, sigma: Tensor, cond: ClassCondition) -> Tensor:
            k = x.shape[1]
            frames = x.flatten(0, 1).unsqueeze(1)
            folded = ClassCondition(cond.label.repeat_interleave(k))
            return net(frames, sigma.repeat_interleave(k), folded).view(x.shape)

        return d
