"""MCM on the tiny preset: each motion representation against hand-computed values, the head and its EMA, the
generator loss replayed draw by draw, the discriminator losses, what each phase updates, the mixed-trajectory
switch, --image-data, resume, and that sampling and export never see the motion head."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from conftest import RandomClips, make_trainer, tiny_config
from prodistill.cli import main
from prodistill.diffusion.consistency import consistency_from_denoised
from prodistill.diffusion.losses import clipped_wgan_d_loss, critic_g_loss, pseudo_huber
from prodistill.diffusion.solvers import euler_step, frame_guidance, guided_denoiser
from prodistill.methods.mcm import MCM
from prodistill.sampling import load_image
from prodistill.methods.motion import (MotionHead, high_frequency, latent_correlation, latent_difference,
                                       low_frequency, lowpass_mask)
from prodistill.training.checkpoint import latest_checkpoint, load_weights
from prodistill.training.logger import read_metrics
from prodistill.training.run import build_models


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tiny_config(tmp_path_factory.mktemp("models"), method="mcm"), torch.device("cpu"))


def _snapshot(named):
    return {k: v.detach().clone() for k, v in named}


def _changed(before, named):
    now = dict(named)
    return {k for k, v in before.items() if not torch.equal(v, now[k].detach())}


def _images(folder, count, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


# -- motion representations -------------------------------------------------------------------------------------
def test_difference_and_correlation_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]).view(1, 2, 2, 1, 2)  # (B, F, C, h, w)
    # frame 0: channel 0 = [1, 2], channel 1 = [3, 4]; frame 1: channel 0 = [5, 6], channel 1 = [7, 8]
    assert torch.equal(latent_difference(x), torch.full((1, 1, 2, 1, 2), 4.0))
    expect = torch.tensor([[1 * 5 + 3 * 7, 1 * 6 + 3 * 8], [2 * 5 + 4 * 7, 2 * 6 + 4 * 8]]) / math.sqrt(2)
    torch.testing.assert_close(latent_correlation(x), expect.view(1, 1, 2, 2))


def test_frequency_split_by_hand():
    t, y, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    nyquist_w, nyquist_ty = (-1.0) ** w, (-1.0) ** (t + y)  # |normalised frequency|² d² = 1 and 2
    x = (2.0 + 3.0 * nyquist_w + 5.0 * nyquist_ty).view(1, 2, 1, 2, 2)
    # Butterworth 1/(1 + (d²/0.25²)⁴): 1 at d = 0, 1/(1 + 16⁴) at d² = 1, 1/(1 + 32⁴) at d² = 2
    low = 2.0 + 3.0 / (1 + 16**4) * nyquist_w + 5.0 / (1 + 32**4) * nyquist_ty
    torch.testing.assert_close(low_frequency(x), low.view_as(x).float())
    torch.testing.assert_close(high_frequency(x), (x - low.view_as(x)).float())


def _freeinit_mask(frames, height, width):
    """FreeInit's Butterworth mask exactly as its loop writes it, in fftshift layout."""
    mask = torch.zeros(frames, height, width)
    for t in range(frames):
        for h in range(height):
            for w in range(width):
                d2 = (2 * t / frames - 1) ** 2 + (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2
                mask[t, h, w] = 1 / (1 + (d2 / 0.25**2) ** 4)
    return mask


def test_lowpass_mask_is_freeinits_for_even_sizes():
    ours = torch.fft.fftshift(lowpass_mask(4, 6, 8).squeeze(1), dim=(0, 1, 2))
    torch.testing.assert_close(ours, _freeinit_mask(4, 6, 8))


def test_motion_head_starts_as_identity_and_computes_the_residual_mlp():
    torch.manual_seed(0)
    head = MotionHead(4)
    x = torch.randn(2, 3, 4, 5, 5)
    assert torch.equal(head(x), x)
    torch.nn.init.normal_(head.conv_out.weight)
    torch.nn.init.normal_(head.conv_out.bias)
    frames = x.flatten(0, 1)
    hidden = F.silu(F.group_norm(F.conv2d(F.silu(frames), head.conv_in.weight, head.conv_in.bias), 32,
                                 head.norm.weight, head.norm.bias))
    expect = x + F.conv2d(hidden, head.conv_out.weight, head.conv_out.bias).view_as(x)
    torch.testing.assert_close(head(x), expect)
    assert {n for n, _ in head.named_parameters()} == {"conv_in.weight", "conv_in.bias", "norm.weight",
                                                       "norm.bias", "conv_out.weight", "conv_out.bias"}


def test_discriminator_losses_by_hand():
    real, fake = torch.tensor([-2.0, 0.5]), torch.tensor([0.3, -3.0])
    torch.testing.assert_close(clipped_wgan_d_loss(real, fake), torch.tensor((2.0 - 0.5) / 2 + (0.3 - 1.0) / 2))
    torch.testing.assert_close(critic_g_loss(torch.tensor([1.0, 3.0])), torch.tensor(-2.0))


# -- the method ---------------------------------------------------------------------------------------------------
def _perturbed(cfg, models, seed=7):
    """An MCM whose LoRA and motion head are non-zero and differ from their EMA copies."""
    torch.manual_seed(0)
    mcm = MCM(cfg, models, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in [*mcm.trainable.values(), *mcm.head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return mcm


def test_generator_loss_replayed_draw_by_draw(models, tmp_path):
    cfg = tiny_config(tmp_path, method="mcm", lambda_real=0.0, lambda_adv=0.7, guidance_min=1.0, guidance_max=2.5,
                      disc_frames=3)
    mcm = _perturbed(cfg, models)
    batch = next(RandomClips(2, cfg.frames, 32))
    out = mcm.compute("generator", batch, {})

    replay = torch.Generator().manual_seed(7)
    x0, cond = models.prepare_batch(batch, cfg.fps, replay)
    rows = torch.arange(2)[:, None]
    real_idx = torch.rand(2, cfg.frames, generator=replay).argsort(1)[:, :3]
    with torch.no_grad():  # λ_real = 0: always the student's 1-step sample from pure noise (MCM eq. 7)
        sigma_max = mcm.grid[-1].expand(2)
        x_T = torch.randn(x0.shape, generator=replay) * mcm.grid[-1]
        start = consistency_from_denoised(x_T, sigma_max, mcm.student_d(x_T, sigma_max, cond))
    eps = torch.randn(x0.shape, generator=replay)
    n = torch.randint(0, cfg.num_timesteps - 1, (2,), generator=replay)
    s_hi, s_lo = mcm.grid[n + 1], mcm.grid[n]
    x = start + s_hi.view(-1, 1, 1, 1, 1) * eps
    ema_head = copy.deepcopy(mcm.head)
    ema_head.load_state_dict(mcm.head_ema.params)
    with torch.no_grad():
        w = frame_guidance(1.0, 2.5, 2, cfg.frames)
        x_phi = euler_step(guided_denoiser(mcm.teacher_solve.teacher_d, cond, cond.unconditional(), w), x, s_hi, s_lo)
        target_m = ema_head(consistency_from_denoised(x_phi, s_lo, mcm.ema_d(x_phi, s_lo, cond)))
    prediction = consistency_from_denoised(x, s_hi, mcm.student_d(x, s_hi, cond))
    prediction_m = mcm.head(prediction)
    distance = pseudo_huber(target_m, prediction_m, 0.00054 * math.sqrt(prediction_m[0].numel())).mean()  # eq. 6
    fake = prediction[rows, torch.rand(2, cfg.frames, generator=replay).argsort(1)[:, :3]]
    expect = distance - 0.7 * mcm.disc(fake).mean()  # eq. 4 with λ_adv = 0.7
    torch.testing.assert_close(out.loss, expect)
    torch.testing.assert_close(out.logs["loss/distance"], distance.detach())
    torch.testing.assert_close(out.cache["real"], x0[rows, real_idx])
    torch.testing.assert_close(out.cache["fake"], fake.detach())
    assert out.logs["mcm/generated_trajectory"] == 1.0
    assert torch.equal(replay.get_state(), mcm.generator.get_state())  # nothing else was drawn


def test_mixed_trajectory_switch_draws_from_the_method_generator(models, tmp_path):
    cfg = tiny_config(tmp_path, method="mcm", lambda_real=0.5)
    mcm = MCM(cfg, models, 2, torch.Generator().manual_seed(3))
    x0, cond = models.prepare_batch(next(RandomClips(1, cfg.frames, 32)), cfg.fps, torch.Generator())
    torch_state = torch.get_rng_state()
    flags = [mcm.trajectory_start(x0, cond)[1] for _ in range(10)]
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNG is never touched
    replay, expected = torch.Generator().manual_seed(3), []
    for _ in range(10):
        generated = not bool(torch.rand((), generator=replay) < 0.5)
        if generated:
            torch.randn(x0.shape, generator=replay)  # the 1-step sample's noise
        expected.append(generated)
    assert flags == expected and set(flags) == {True, False}
    assert torch.equal(replay.get_state(), mcm.generator.get_state())
    for lam, want in ((1.0, False), (0.0, True)):
        always = MCM(tiny_config(tmp_path, method="mcm", lambda_real=lam), models, 2, torch.Generator())
        assert {always.trajectory_start(x0, cond)[1] for _ in range(3)} == {want}


def test_discriminator_phase_hinge_and_wgan_with_feature_penalty(models, tmp_path):
    for loss_name in ("hinge", "wgan"):
        cfg = tiny_config(tmp_path, method="mcm", disc_loss=loss_name, disc_gp=0.1)
        mcm = MCM(cfg, models, 2, torch.Generator().manual_seed(5))
        real, fake = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
        out = mcm.compute("discriminator", {}, {"real": real, "fake": fake})
        r, f = mcm.disc(real), mcm.disc(fake)
        adv = (F.relu(1 - r).mean() + F.relu(1 + f).mean()) if loss_name == "hinge" else clipped_wgan_d_loss(r, f)
        replay = torch.Generator().manual_seed(5)
        alpha = torch.rand((2, 2, 1, 1, 1), generator=replay)
        mixed = (alpha * real + (1 - alpha) * fake).flatten(0, 1)
        features = [t.detach().requires_grad_(True) for t in mcm.disc.features(mcm.disc.preprocess(mixed))]
        grads = torch.autograd.grad(mcm.disc.heads(features, 2, 2).sum(), features)
        per_frame = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))  # 4 judged frames
        penalty = (per_frame - 1).pow(2).mean()
        torch.testing.assert_close(out.logs["loss/d_gp"], penalty)
        torch.testing.assert_close(out.loss, adv + 0.1 * penalty)
        out.loss.backward()
        assert all(p.grad is not None for p in mcm.disc.heads.parameters())
        assert all(p.grad is None for p in mcm.disc.backbone.parameters())


def test_each_phase_updates_only_its_parameters_and_the_emas_follow(models, tmp_path):
    cfg = tiny_config(tmp_path, method="mcm", max_steps=1)
    trainer, mcm, _ = make_trainer(cfg, tmp_path / "run", models=models)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(mcm.parameters("generator")) == ids(mcm.trainable.values()) | ids(mcm.head.parameters())
    assert ids(mcm.parameters("discriminator")) == ids(mcm.disc.upsampler.parameters()) | ids(mcm.disc.heads.parameters())
    assert mcm.disc.heads.temporal is None  # an image discriminator
    teacher = _snapshot(models.unet.named_parameters())
    backbone = _snapshot(mcm.disc.backbone.named_parameters())
    student = _snapshot(mcm.student.named_parameters())
    disc = _snapshot(mcm.disc.trainable_state_dict().items())
    ema, head_ema = _snapshot(mcm.ema.params.items()), _snapshot(mcm.head_ema.params.items())
    trainer.fit()
    assert not _changed(teacher, models.unet.named_parameters())
    assert not _changed(backbone, mcm.disc.backbone.named_parameters())
    changed = _changed(student, mcm.student.named_parameters())
    assert changed and all("lora_" in k for k in changed)
    assert _changed(disc, mcm.disc.trainable_state_dict().items()) == set(disc)
    head = dict(mcm.head.named_parameters())
    assert {"conv_out.weight", "conv_out.bias"} <= _changed(head_ema, head.items())  # zero-init layer: first gradient
    for before, live, now in ((ema, dict(mcm.student.named_parameters()), mcm.ema.params),
                              (head_ema, head, mcm.head_ema.params)):
        for k in before:  # θ⁻ ← 0.95·θ⁻ + 0.05·θ after the generator step
            torch.testing.assert_close(now[k], 0.95 * before[k] + 0.05 * live[k].detach())
    assert set(load_weights(latest_checkpoint(tmp_path / "run" / "stage2"))) == {
        "student", "ema", "discriminator", "motion_head", "motion_head_ema"}


def test_resume_reproduces_the_uninterrupted_run(models, tmp_path):
    cfg = tiny_config(tmp_path, method="mcm", max_steps=4, lambda_real=0.5)
    straight, _, _ = make_trainer(cfg, tmp_path / "straight", models=models)
    straight.fit()
    run = tmp_path / "interrupted"
    t_a, _, _ = make_trainer(tiny_config(tmp_path, method="mcm", max_steps=2, lambda_real=0.5), run, models=models)
    t_a.fit()
    t_b, _, _ = make_trainer(cfg, run, models=models)
    t_b.resume(latest_checkpoint(run / "stage2"))
    t_b.fit()
    keys = ("loss/g_total", "loss/d", "loss/d_gp", "mcm/generated_trajectory")
    rows = lambda d: [(r["step"], *(r[k] for k in keys)) for r in read_metrics(d)]  # noqa: E731
    assert rows(run) == rows(tmp_path / "straight") and len(rows(run)) == 4
    assert {r[-1] for r in rows(run)} == {0.0, 1.0}  # both kinds of trajectory were trained on
    assert all(math.isfinite(v) for r in rows(run) for v in r)


def test_exported_student_has_no_motion_head(models, tmp_path):
    from export.run import merged_student

    cfg = tiny_config(tmp_path, method="mcm", max_steps=1)
    trainer, mcm, _ = make_trainer(cfg, tmp_path / "run", models=models)
    trainer.fit()
    ckpt = latest_checkpoint(tmp_path / "run" / "stage2")
    unet = merged_student(cfg, models, ckpt, "ema")
    assert set(unet.state_dict()) == set(models.unet.state_dict())


def test_image_data_frames_and_errors(models, tmp_path):
    folder = _images(tmp_path / "images", 3)
    (folder / "broken.png").write_bytes(b"not an image")
    cfg = tiny_config(tmp_path, method="mcm", image_data=str(folder), disc_frames=2)
    MCM.check(cfg)
    mcm = MCM(cfg, models, 2, torch.Generator().manual_seed(1))
    x0 = torch.zeros(2, cfg.frames, 4, 4, 4)
    with pytest.warns(UserWarning, match="broken.png"):
        real = mcm.real_frames(x0)
    replay = torch.Generator().manual_seed(1)
    idx = torch.randint(4, (4,), generator=replay).tolist()
    assert idx == [1, 3, 0, 0]  # files: broken.png, img0..2.png; broken.png's reads fall back to img0.png
    pixels = torch.cat([load_image(folder / f"img{max(i - 1, 0)}.png", 32, 32) for i in idx])
    expect = models.encode_video(pixels.unflatten(0, (2, 2)), replay)
    torch.testing.assert_close(real, expect)
    assert mcm.images.skipped == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        MCM.check(tiny_config(tmp_path, method="mcm", image_data=str(empty)))
    with pytest.raises(ValueError, match="only by --method mcm"):
        tiny_config(tmp_path, method="lcm", image_data=str(folder))
    for bad, message in (({"lambda_real": 1.5}, "--lambda-real"), ({"disc_frames": 5}, "--disc-frames"),
                         ({"disc_loss": "bce"}, "--disc-loss"), ({"motion_repr": "flow"}, "--motion-repr")):
        with pytest.raises(ValueError, match=message):
            tiny_config(tmp_path, method="mcm", **bad)


TINY = ["--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--lora-rank", "2", "--disc-head-channels", "8",
        "--num-timesteps", "10", "--device", "cpu"]


def test_cli_flags_train_and_sample(tmp_path):
    import yaml

    from prodistill.data.video import probe_video

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(main, ["train", "--method", "mcm", "--out", str(tmp_path / "no"), "--image-data",
                                        str(empty), *TINY])
    assert refused.exit_code != 0 and "holds no images" in refused.output
    assert not (tmp_path / "no").exists()  # refused before any model was built or folder written

    run = tmp_path / "run"
    flags = ["--motion-repr", "diff", "--image-data", str(_images(tmp_path / "images", 2)), "--lambda-real", "0.25",
             "--disc-frames", "3", "--disc-loss", "wgan", "--lambda-adv", "0.5", "--disc-gp", "0"]
    result = CliRunner().invoke(main, ["train", "--method", "mcm", "--out", str(run), "--max-steps", "1", *TINY,
                                       *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["motion_repr"], saved["lambda_real"], saved["disc_frames"], saved["disc_loss"], saved["lambda_adv"],
            saved["disc_gp"]) == ("diff", 0.25, 3, "wgan", 0.5, 0.0)
    assert saved["disc_lr"] == 1e-4  # the tiny preset's value beats mcm's own 5e-5
    assert {p.stem for p in (run / "stage2" / "ckpt-0000001").glob("*.safetensors")} == {
        "student", "ema", "discriminator"}  # no head without --motion-repr learned
    image = tmp_path / "cond.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "out.mp4"
    sampled = CliRunner().invoke(main, ["sample", "--ckpt", str(run), "--image", str(image), "--steps", "2",
                                        "--out", str(out), "--device", "cpu"])
    assert sampled.exit_code == 0, sampled.output
    assert probe_video(out).num_frames == 4


def test_fsdp_with_a_random_trajectory_start_is_refused_before_any_model(tmp_path):
    """With 0 < λ_real < 1 each rank decides alone whether to run the student's sample (a sharded forward under
    FSDP), which would hang the ranks; λ_real 0 or 1 and DDP are allowed."""
    from prodistill.methods.mcm import MCM

    MCM.check(tiny_config(tmp_path, method="mcm", parallel="ddp", lambda_real=0.5))
    for lam in (0.0, 1.0):
        MCM.check(tiny_config(tmp_path, method="mcm", parallel="fsdp", lambda_real=lam))
    with pytest.raises(ValueError, match="--parallel ddp"):
        MCM.check(tiny_config(tmp_path, method="mcm", parallel="fsdp", lambda_real=0.5))
