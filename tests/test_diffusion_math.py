"""Every diffusion formula against values computed by hand (or in closed form) in the test itself."""

import math
from dataclasses import dataclass

import pytest
import torch

from prodistill.diffusion import edm
from prodistill.diffusion.consistency import consistency_coefficients, consistency_fn
from prodistill.diffusion.losses import default_huber_c, hinge_d_loss, hinge_g_loss, pseudo_huber
from prodistill.diffusion.samplers import consistency_sample, time_travel_sample
from prodistill.diffusion.solvers import (cfg_combine, edm_euler_sample, euler_step, frame_guidance,
                                          guided_denoiser, teacher_solve)

T = torch.tensor


def test_edm_preconditioning_at_sigma_one():
    c_skip, c_out, c_in, c_noise = edm.preconditioning(T([1.0]))
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(-1 / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / math.sqrt(2))
    assert c_noise.item() == pytest.approx(0.0)
    assert edm.preconditioning(T([math.e**4]))[3].item() == pytest.approx(1.0)  # ¼·ln σ


def test_karras_sigmas_by_hand():
    s = edm.karras_sigmas(3)
    mid = ((700 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert s.tolist() == pytest.approx([700.0, mid, 0.002])
    grid = edm.training_grid(100)
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(700.0)
    assert bool((grid[1:] > grid[:-1]).all())


def test_sampler_indices():
    assert edm.sampler_indices(1, 100) == [99]
    assert edm.sampler_indices(2, 100) == [99, 50]
    assert edm.sampler_indices(4, 100) == [99, 75, 50, 25]
    with pytest.raises(ValueError):
        edm.sampler_indices(0, 100)


def test_consistency_boundary_condition_and_values():
    c_skip, c_out = consistency_coefficients(T([0.002]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    s = 1.002  # σ − σ_min = 1
    c_skip, c_out = consistency_coefficients(T([s], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(1 / math.sqrt(s * s + 1))
    x = torch.randn(3, 2, 4)
    out = consistency_fn(lambda x, sigma: torch.full_like(x, 7.0), x, torch.full((3,), 0.002))
    assert torch.equal(out, x)  # f(x, σ_min) = x exactly


def test_timestep_scaled_consistency_coefficients():
    """--cm-scale s: c_skip = σd²/((sΔ)²+σd²), c_out = σd·sΔ/√((sσ)²+σd²) (Δ = σ − σmin), by hand; s = 1 is Song et
    al.'s form; the boundary stays exact for any s and σd; larger s leaves less of x at a few-step sampler's σ."""
    from prodistill.diffusion.consistency import SONG, ConsistencyParam

    sigma = T([1.002, 0.5], dtype=torch.float64)
    c_skip, c_out = ConsistencyParam(sigma_data=0.5, scale=10.0).coefficients(sigma)
    delta = sigma - 0.002
    assert c_skip.tolist() == pytest.approx((0.25 / ((10 * delta) ** 2 + 0.25)).tolist())
    assert c_out.tolist() == pytest.approx((0.5 * 10 * delta / ((10 * sigma) ** 2 + 0.25).sqrt()).tolist())
    assert c_skip[0].item() == pytest.approx(0.25 / 100.25)
    assert [t.tolist() for t in SONG.coefficients(sigma)] == [t.tolist() for t in consistency_coefficients(sigma)]
    for param in (ConsistencyParam(0.5, 10.0), ConsistencyParam(1.0, 4.0)):
        b_skip, b_out = param.coefficients(T([0.002]))
        assert b_skip.item() == 1.0 and b_out.item() == 0.0
    assert ConsistencyParam(1.0, 10.0).coefficients(sigma)[0][1] < SONG.coefficients(sigma)[0][1] / 20  # 0.039 vs 0.80


def test_pseudo_huber_and_c():
    x = T([[3.0, 4.0], [0.0, 0.0]])
    d = pseudo_huber(x, torch.zeros_like(x), c=1.0)
    assert d.tolist() == pytest.approx([math.sqrt(26) - 1, 0.0])
    assert default_huber_c(10000) == pytest.approx(0.054)


def test_hinge_losses():
    assert hinge_d_loss(T([2.0, 0.5]), T([-2.0, 0.0])).item() == pytest.approx(0.25 + 0.5)
    assert hinge_g_loss(T([0.5, -1.0])).item() == pytest.approx(1.25)


def test_cfg_per_frame():
    w = frame_guidance(1.0, 3.0, batch=1, frames=3)
    assert w.tolist() == [[1.0, 2.0, 3.0]]
    d_u, d_c = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    assert cfg_combine(d_u, d_c, w)[0, :, 0].tolist() == [1.0, 2.0, 3.0]
    assert cfg_combine(d_u, 2 * d_c, 1.5).unique().item() == 3.0


def test_euler_step_by_hand():
    x = T([[2.0]])
    out = euler_step(lambda x, s: 0.5 * x, x, T([2.0]), T([1.0]))
    assert out.item() == pytest.approx(2 + (1 - 2) * (2 - 1) / 2)


def test_teacher_solve_is_exact_for_a_constant_denoiser():
    # D ≡ c makes the PF-ODE linear in σ: x(σ) = c + (x_T − c)·σ/σ_T, which Euler integrates exactly (eq. 8).
    grid = edm.training_grid(100)
    path = grid[torch.tensor([[30, 29, 28, 27, 26, 25], [60, 59, 58, 57, 56, 55]])]
    x = torch.randn(2, 3)
    c = 0.7
    out = teacher_solve(lambda x, s: torch.full_like(x, c), x.double(), path)
    expect = c + (x.double() - c) * (path[:, -1] / path[:, 0]).unsqueeze(1)
    assert torch.allclose(out, expect, rtol=1e-9, atol=1e-12)


@dataclass
class ToyCond:
    scale: torch.Tensor

    def cat(self, other):
        return ToyCond(torch.cat([self.scale, other.scale]))


def test_guided_denoiser_batches_both_branches_once():
    calls = []

    def denoise(x, sigma, cond):
        calls.append(x.shape[0])
        return x * cond.scale.view(-1, 1, 1)

    d = guided_denoiser(denoise, ToyCond(T([2.0])), ToyCond(T([0.0])), guidance=T([[1.0, 3.0]]))
    out = d(torch.ones(1, 2, 1), T([5.0]))
    assert calls == [2]
    assert out[0, :, 0].tolist() == [2.0, 6.0]  # 0 + w·(2 − 0) per frame
    split = guided_denoiser(denoise, ToyCond(T([2.0])), ToyCond(T([0.0])), guidance=T([[1.0, 3.0]]), split=True)
    assert torch.equal(split(torch.ones(1, 2, 1), T([5.0])), out) and calls == [2, 1, 1]  # --split-cfg: B, B


def test_teacher_sampler_converges_to_a_gaussian():
    # x0 ~ N(μ, s²) has the exact denoiser D(x, σ) = μ + s²/(s²+σ²)·(x − μ); Euler on the PF-ODE from σ_max
    # converges (first order) to N(μ, s²) as steps grow.
    mu, s = 1.5, 0.5
    d = lambda x, sigma: mu + s * s / (s * s + sigma.view(-1, 1) ** 2) * (x - mu)  # noqa: E731

    def std_error(steps):
        noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = edm_euler_sample(d, noise, edm.karras_sigmas(steps))
        assert out.mean().item() == pytest.approx(mu, abs=0.02)
        return abs(out.std().item() - s)

    e25, e50, e400 = std_error(25), std_error(50), std_error(400)
    assert e400 < 0.005
    assert e50 < 0.6 * e25  # first order: doubling the steps about halves the error


def _coef(sigma):
    return consistency_coefficients(T([sigma], dtype=torch.float64))


def test_consistency_sampler_one_step_by_hand():
    a = 0.5
    noise = T([[1.0]], dtype=torch.float64)
    out = consistency_sample(lambda x, s: a * x, noise, T([700.0]))
    c_skip, c_out = _coef(700.0)
    x = 700.0
    assert out.item() == pytest.approx((c_skip * x + c_out * a * x).item())


def test_time_travel_sampler_one_step_by_hand():
    a, eps0, sa, sb = 0.5, 0.8, 700.0, 3.0
    calls = []

    def d(x, s):
        calls.append(float(s[0]))
        return a * x

    out = time_travel_sample(d, T([[eps0]], dtype=torch.float64), T([sa]), T([sa, sb]))
    # eq. 13 by hand, k = 1, i = 0
    ks_a, ko_a = (v.item() for v in _coef(sa))
    ks_b, ko_b = (v.item() for v in _coef(sb))
    x = sa * eps0
    f_a = ks_a * x + ko_a * a * x
    e_a = (eps0 + (x - f_a) / sa) / 2
    x_b = f_a + sb * e_a
    f_b = ks_b * x_b + ko_b * a * x_b
    e_b = (eps0 + (x_b - f_b) / sb) / 2
    expect = ks_a * (f_b + sa * e_b) + ko_a * a * x_b + 0.0 * eps0
    assert out.item() == pytest.approx(expect, rel=1e-12)
    assert calls == [sa, sb]  # NFE 2 at one step


def test_time_travel_sampler_checks_schedules():
    with pytest.raises(ValueError):
        time_travel_sample(lambda x, s: x, torch.ones(1, 1), T([700.0]), T([700.0]))
