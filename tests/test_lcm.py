"""LCM on the tiny preset: what a step updates, the single-step guided-teacher target, and resume."""

from __future__ import annotations

import pytest
import torch

from conftest import RandomClips, make_trainer, tiny_config
from prodistill.diffusion.consistency import consistency_from_denoised
from prodistill.diffusion.losses import pseudo_huber
from prodistill.diffusion.solvers import euler_step, frame_guidance, guided_denoiser
from prodistill.methods.consistency import huber_c
from prodistill.methods.lcm import LCM
from prodistill.training.checkpoint import latest_checkpoint, load_weights
from prodistill.training.logger import read_metrics
from prodistill.training.run import build_models


def test_lcm_is_single_stage_without_discriminator(tmp_path):
    cfg = tiny_config(tmp_path, method="lcm")
    assert cfg.stages() == (2,)
    models = build_models(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="stage 2"):
        LCM(cfg, models, 1, torch.Generator())
    lcm = LCM(cfg, models, 2, torch.Generator())
    assert lcm.phases == ("generator",)
    assert not hasattr(lcm, "disc")
    assert set(lcm.weights()) == {"student", "ema"}


def test_lcm_step_updates_only_lora_and_ema(tmp_path):
    cfg = tiny_config(tmp_path, method="lcm", max_steps=1)
    trainer, lcm, models = make_trainer(cfg, tmp_path / "run")
    teacher = {k: v.detach().clone() for k, v in models.unet.named_parameters()}
    student_all = {k: v.detach().clone() for k, v in lcm.student.named_parameters()}
    ema = {k: v.clone() for k, v in lcm.ema.params.items()}
    trainer.fit()
    assert all(torch.equal(v, dict(models.unet.named_parameters())[k]) for k, v in teacher.items())
    now = dict(lcm.student.named_parameters())
    changed = {k for k, v in student_all.items() if not torch.equal(v, now[k].detach())}
    assert changed and all("lora_" in k for k in changed)
    ema_changed = {k for k, v in ema.items() if not torch.equal(v, lcm.ema.params[k])}
    assert ema_changed
    for k in ema_changed:  # θ⁻ ← μ·θ⁻ + (1 − μ)·θ
        torch.testing.assert_close(lcm.ema.params[k], cfg.ema_decay * ema[k] + (1 - cfg.ema_decay) * now[k].detach())
    saved = load_weights(latest_checkpoint(tmp_path / "run" / "stage2"))
    assert set(saved) == {"student", "ema"}  # no discriminator anywhere


def test_lcm_target_is_one_guided_euler_step_whatever_solver_steps(tmp_path):
    cfg = tiny_config(tmp_path, method="lcm", solver_steps=3, guidance_min=1.0, guidance_max=2.5)
    models = build_models(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    lcm = LCM(cfg, models, 2, torch.Generator().manual_seed(7))
    with torch.no_grad():  # a non-zero LoRA, so student, EMA and teacher differ
        for k, p in lcm.trainable.items():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(RandomClips(2, cfg.frames, 32))
    replay = torch.Generator().manual_seed(7)
    loss = lcm.compute("generator", batch, {}).loss

    x0, cond = models.prepare_batch(batch, cfg.fps, replay)
    eps = torch.randn(x0.shape, generator=replay)
    n = torch.randint(0, cfg.num_timesteps - 1, (2,), generator=replay)
    s_hi, s_lo = lcm.grid[n + 1], lcm.grid[n]
    x = x0 + s_hi.view(-1, 1, 1, 1, 1) * eps
    with torch.no_grad():
        w = frame_guidance(cfg.guidance_min, cfg.guidance_max, 2, cfg.frames)
        x_phi = euler_step(guided_denoiser(lcm.teacher_solve.teacher_d, cond, cond.unconditional(), w), x, s_hi, s_lo)
        target = consistency_from_denoised(x_phi, s_lo, lcm.ema_d(x_phi, s_lo, cond))
    prediction = consistency_from_denoised(x, s_hi, lcm.student_d(x, s_hi, cond))
    expect = pseudo_huber(target, prediction, huber_c(cfg, x0)).mean()
    torch.testing.assert_close(loss, expect)


def test_lcm_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = tiny_config(tmp_path, method="lcm", max_steps=4)
    straight = tmp_path / "straight"
    trainer, _, models = make_trainer(cfg, straight)
    trainer.fit()
    interrupted = tmp_path / "interrupted"
    t_a, _, _ = make_trainer(tiny_config(tmp_path, method="lcm", max_steps=2), interrupted, models=models)
    t_a.fit()
    t_b, _, _ = make_trainer(cfg, interrupted, models=models)
    t_b.resume(latest_checkpoint(interrupted / "stage2"))
    t_b.fit()
    losses = lambda d: [(r["step"], r["loss/g_total"]) for r in read_metrics(d)]  # noqa: E731
    assert losses(interrupted) == losses(straight) and len(losses(straight)) == 4


def test_cm_scale_reaches_the_loss(tmp_path, monkeypatch):
    """--cm-scale changes the consistency pair: target and prediction use the scaled coefficients."""
    import prodistill.methods.consistency as mc

    seen = []
    original = mc.consistency_from_denoised
    monkeypatch.setattr(mc, "consistency_from_denoised", lambda *a: seen.append(a[3]) or original(*a))
    for scale in (1.0, 10.0):
        cfg = tiny_config(tmp_path, method="lcm", max_steps=1, cm_scale=scale, out=str(tmp_path / f"s{scale}"))
        trainer, _, _ = make_trainer(cfg, tmp_path / f"s{scale}")
        trainer.fit()
    assert {p.scale for p in seen} == {1.0, 10.0}
    losses = [read_metrics(tmp_path / f"s{s}")[0]["loss/distance"] for s in (1.0, 10.0)]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)
