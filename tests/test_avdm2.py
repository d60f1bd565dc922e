"""AVDM2: its losses against hand-computed values, backward simulation, the noise ranges, the 2D teachers, the
discriminator's encoder, what each phase updates and how often, resume, and sampling at k steps (tiny preset)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import RandomClips, make_trainer, tiny_config
from prodistill.bench.analytic import ClassCondition, MixtureSpec, VideoGaussianMixture
from prodistill.diffusion.edm import ddpm_sigmas, training_grid
from prodistill.diffusion.losses import logistic_d_loss, logistic_g_loss
from prodistill.diffusion.samplers import consistency_sample
from prodistill.methods.avdm2 import AVDM2, denoising_loss, distribution_matching_loss, timestep_range
from prodistill.sampling import sample_student
from prodistill.training.checkpoint import latest_checkpoint
from prodistill.training.logger import read_metrics
from prodistill.training.run import build_models

SMALL = dict(method="avdm2", sdm_frames=2, student_steps=2, disc_head_channels=8)
"""4 frames of 32², K = 2, k = 2, a 10-step grid: a training step takes about a second on one thread."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tiny_config(tmp_path_factory.mktemp("models"), **SMALL), torch.device("cpu"))


# -- the losses, by hand ------------------------------------------------------------------------------------
def test_logistic_losses_match_hand_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0])
    expect_d = (math.log1p(math.exp(-2)) + math.log(2)) / 2 + (math.log1p(math.exp(-1)) + math.log(2)) / 2
    assert logistic_d_loss(real, fake).item() == pytest.approx(expect_d, rel=1e-6)
    # non-saturating: −log σ(D(fake)), large when the discriminator rejects the fake
    assert logistic_g_loss(fake).item() == pytest.approx((math.log1p(math.e) + math.log(2)) / 2, rel=1e-6)


def test_distribution_matching_gradient_on_a_toy_denoiser_pair():
    """D_real(x) = x/2, D_fake(x) = x at x_t = x0 + σ·ε, by hand: x0 = (1, −2), ε = (½, ½), σ = 2 → x_t = (2, −1),
    D_real = (1, −½), D_fake = (2, −1), mean|x0 − D_real| = ¾, grad = (1, −½)/¾ = (4/3, −2/3),
    loss = ½·mean(grad²) = 5/9, ∂loss/∂x0 = grad/2 = (2/3, −1/3)."""
    x0 = torch.tensor([1.0, -2.0]).view(1, 1, 2, 1, 1).requires_grad_(True)
    x_t = x0.detach() + 2.0 * 0.5
    loss = distribution_matching_loss(x0, x_t / 2, x_t)
    assert loss.item() == pytest.approx(5 / 9, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, x0)
    torch.testing.assert_close(grad.flatten(), torch.tensor([2 / 3, -1 / 3]))
    # the normaliser is per frame: a second frame scaled by 10 gets the same gradient, not 10× it
    two = torch.cat([x0.detach(), 10 * x0.detach()], dim=1).requires_grad_(True)
    x_t2 = torch.cat([x_t, 10 * x_t], dim=1)
    (g2,) = torch.autograd.grad(distribution_matching_loss(two, x_t2 / 2, x_t2), two)
    torch.testing.assert_close(g2[:, 0], g2[:, 1])


def test_distribution_matching_moves_samples_towards_the_teacher_distribution():
    """Teacher data N(0, 1), generated data N(m, 1): exact denoisers D_real = x/(1+σ²) and
    D_fake = (x + σ²m)/(1+σ²). Descending the loss must pull the samples' mean from m towards 0."""
    g = torch.Generator().manual_seed(0)
    m = 2.0
    x0 = (m + torch.randn(64, 1, 1, 4, 4, generator=g)).requires_grad_(True)
    sigma = torch.rand(64, 1, 1, 1, 1, generator=g) * 3 + 0.2
    x_t = x0.detach() + sigma * torch.randn(x0.shape, generator=g)
    real, fake = x_t / (1 + sigma**2), (x_t + sigma**2 * m) / (1 + sigma**2)
    (grad,) = torch.autograd.grad(distribution_matching_loss(x0, real, fake), x0)
    assert (grad > 0).all()  # every element is pushed down, towards the teacher's mean 0
    same = distribution_matching_loss(x0, real, real)  # no gradient once the fake equals the teacher
    assert torch.autograd.grad(same, x0)[0].abs().max() == 0


def test_denoising_loss_is_eq2_in_epsilon_form():
    x0, eps, sigma = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([2.0])
    denoised = torch.tensor([[0.0, 2.0]])
    eps_hat = (x0 + sigma[:, None] * eps - denoised) / sigma[:, None]
    assert denoising_loss(denoised, x0, sigma).item() == pytest.approx(((eps_hat - eps) ** 2).mean().item())
    assert denoising_loss(denoised, x0, sigma).item() == pytest.approx(0.125)  # ((1 − 0)/2)² / 2


# -- noise ranges and backward simulation -------------------------------------------------------------------
def test_noise_ranges_are_the_papers_timesteps():
    """T is the 1000-step DDPM schedule of SD (scaled-linear β 0.00085-0.012); σ_t = √((1 − ᾱ_t)/ᾱ_t)."""
    betas = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    alpha_bar = np.cumprod([1 - b for b in betas])
    expect = np.sqrt((1 - alpha_bar) / alpha_bar)
    np.testing.assert_allclose(ddpm_sigmas().numpy(), expect, rtol=1e-10)
    assert timestep_range(0.0, 0.5) == (0, 500)  # t ~ U[0, 0.5T]: σ 0.029 … 1.62
    assert timestep_range(0.2, 0.98) == (200, 980)  # t ~ U[0.2T, 0.98T]: σ 0.57 … 13.0
    assert timestep_range(0.0, 1.0) == (0, 999)
    assert timestep_range(0.29, 0.29) == (290, 290)  # 0.29·1000 is not rounded past its integer
    assert (round(float(expect[500]), 2), round(float(expect[200]), 2), round(float(expect[980]), 1)) == (1.62, 0.57, 13.0)
    with pytest.raises(ValueError, match="holds no timestep"):
        timestep_range(0.3001, 0.3009)


@pytest.mark.parametrize("consistency", [True, False])
def test_backward_simulation_input_is_the_samplers_own_state(consistency):
    """consistency_sample(stop=j) returns exactly the input the k-step sampler hands the generator at step j."""
    k, seen = 4, []

    def denoise(x, sigma):
        seen.append(x.clone())
        return 0.5 * x + 0.1

    sigmas = training_grid(10).flip(0)[[0, 3, 6, 8]].float()
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    final = consistency_sample(denoise, noise, sigmas, torch.Generator().manual_seed(1), consistency=consistency)
    inputs = list(seen)
    assert len(inputs) == k
    for j in range(k):
        seen.clear()
        state = consistency_sample(denoise, noise, sigmas, torch.Generator().manual_seed(1), stop=j,
                                   consistency=consistency)
        torch.testing.assert_close(state, inputs[j], rtol=0, atol=0)
        assert len(seen) == j  # only the j steps before it ran
    if not consistency:  # a plain generator's last step returns the denoiser's output itself
        torch.testing.assert_close(final, 0.5 * inputs[-1] + 0.1, rtol=0, atol=0)


def test_generator_at_its_last_step_is_its_own_k_step_sample(tmp_path, models):
    cfg = tiny_config(tmp_path, **SMALL)
    torch.manual_seed(0)
    method = AVDM2(cfg, models, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():  # a non-zero LoRA, so the generator is not the teacher
        for p in method.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    _, cond = models.prepare_batch(next(RandomClips(2, cfg.frames, 32)), cfg.fps, torch.Generator())
    shape = models.latent_shape(2, cfg.frames, 32, 32)
    with torch.no_grad():
        trained_on = method.generate(cond, shape, step=cfg.student_steps - 1)
        sampled = sample_student(lambda x, s: method.student_d(x, s, cond), shape, cfg.student_steps, False,
                                 cfg.num_timesteps, torch.Generator().manual_seed(3), models.device,
                                 consistency=False)
    torch.testing.assert_close(trained_on, sampled, rtol=0, atol=0)
    assert torch.equal(method.sigmas, training_grid(10).float()[[9, 5]])  # k = 2 on the 10-step grid


def test_generator_starts_as_the_teachers_denoiser(tmp_path, models):
    """Algorithm 1, line 2: at initialisation (LoRA B = 0) G_θ(x_σ) is the teacher's D(x_σ, σ), not a
    consistency function of it."""
    cfg = tiny_config(tmp_path, **SMALL)
    method = AVDM2(cfg, models, 2, torch.Generator().manual_seed(5))
    _, cond = models.prepare_batch(next(RandomClips(1, cfg.frames, 32)), cfg.fps, torch.Generator())
    shape = models.latent_shape(1, cfg.frames, 32, 32)
    with torch.no_grad():
        generated = method.generate(cond, shape, step=0)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        sigma = method.sigmas[:1]
        expect = models.denoiser(models.unet)(noise * sigma, sigma, cond)
    torch.testing.assert_close(generated, expect)


def test_noise_levels_are_drawn_from_their_ranges(tmp_path, models):
    cfg = tiny_config(tmp_path, **SMALL)
    method = AVDM2(cfg, models, 2, torch.Generator().manual_seed(0))
    table = ddpm_sigmas().float()
    for t_range, (lo, hi) in ((method.adm_range, (0, 500)), (method.sdm_range, (200, 980))):
        assert t_range == (lo, hi)
        drawn = method._noise_level(t_range, 20000)
        assert drawn.min() == table[lo] and drawn.max() == table[hi]  # both ends reached, nothing outside
        assert set(drawn.tolist()) <= set(table[lo : hi + 1].tolist())


# -- the models' parts AVDM2 uses ---------------------------------------------------------------------------
def test_encoder_features_are_the_unet_forwards_own_hidden_states(models):
    unet, g = models.unet, torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 4, 4, generator=g), torch.rand(2, generator=g)
    context, ids = torch.randn(2, 1, 32, generator=g), torch.randn(2, 3, generator=g)
    seen = {}
    hooks = [unet.down_blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("down0", o[1][-2])),
             unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))]
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=context, added_time_ids=ids)
            from prodistill.models.svd import unet_encoder_features

            features = unet_encoder_features(unet, x, t, context, ids)
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(f.shape) for f in features] == [(2, 3, 32, 4, 4), (2, 3, 64, 2, 2)]
    torch.testing.assert_close(features[0].flatten(0, 1), seen["down0"], rtol=0, atol=0)  # before the downsampler
    torch.testing.assert_close(features[1].flatten(0, 1), seen["mid"], rtol=0, atol=0)
    assert models.encoder_channels(4, 4) == [32, 64]


def test_discriminator_head_reads_the_coarsest_three_scales(tmp_path, models, monkeypatch):
    """SVD at 512² has four encoder resolutions (320@64², 640@32², 1280@16², 1280@8²); the head takes three."""
    monkeypatch.setattr(models, "encoder_channels", lambda h, w: [320, 640, 1280, 1280])
    method = AVDM2(tiny_config(tmp_path, **SMALL), models, 2, torch.Generator())
    assert [branch[0].in_channels for branch in method.head.branches] == [640, 1280, 1280]


def test_svd_frame_teacher_runs_each_frame_as_a_one_frame_video(models):
    teacher = models.image_teacher()
    assert teacher.net is models.unet
    g = torch.Generator().manual_seed(0)
    _, cond = models.prepare_batch(next(RandomClips(2, 4, 32)), 7.0, g)
    x, sigma = torch.randn(2, 3, 4, 4, 4, generator=g), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        folded = teacher.denoiser(teacher.net)(x, sigma, cond)
        video_d = models.denoiser(models.unet)
        for b in range(2):
            for k in range(3):
                one = type(cond)(cond.image_embeds[b : b + 1], cond.image_latents[b : b + 1, :1],
                                 cond.added_time_ids[b : b + 1])
                alone = video_d(x[b : b + 1, k : k + 1], sigma[b : b + 1], one)
                torch.testing.assert_close(folded[b, k], alone[0, 0], rtol=1e-5, atol=1e-5)


def test_frame_marginal_is_the_exact_single_frame_denoiser():
    mix = VideoGaussianMixture(MixtureSpec(frames=3, channels=1, height=2, width=2, classes=2), seed=1)
    marginal = mix.frame_marginal()
    g = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(5, 1, 1, 2, 2, generator=g), torch.full((5,), 0.7), torch.tensor([0, 1, -1, 0, 1])
    got = marginal(x, sigma, ClassCondition(labels))
    for b in range(5):  # brute force over every (component, frame) pair: N(μ_k[f], s_k²·I)
        log_p, means = [], []
        for k in range(mix.spec.components):
            if labels[b] >= 0 and mix.component_class[k] != labels[b]:
                continue
            for f in range(mix.spec.frames):
                mu, var = mix.means[k, f], mix.variances[k]
                d = x[b].double().flatten() - mu
                log_p.append(-0.5 * (d.numel() * torch.log(2 * math.pi * (var + 0.49)) + d.pow(2).sum() / (var + 0.49)))
                means.append(mu + var / (var + 0.49) * d)
        w = torch.softmax(torch.stack(log_p), 0)
        torch.testing.assert_close(got[b].double().flatten(), (w[:, None] * torch.stack(means)).sum(0),
                                   rtol=1e-5, atol=1e-6)


# -- a training step: what each phase updates, and how often ------------------------------------------------
def _snapshot(named):
    return {k: v.detach().clone() for k, v in named}


def _changed(before, named):
    now = dict(named)
    return {k for k, v in before.items() if not torch.equal(v, now[k].detach())}


def test_each_phase_updates_its_own_parameters_critics_twice(tmp_path, models):
    cfg = tiny_config(tmp_path, max_steps=1, **SMALL)
    trainer, method, _ = make_trainer(cfg, tmp_path / "run", models=models)
    assert method.phases == ("generator", "discriminator", "fake_score")
    params = {ph: {id(p) for g in method.parameters(ph) for p in g["params"]} for ph in method.phases}
    assert params["generator"] == {id(p) for p in method.trainable.values()}
    assert params["discriminator"] == {id(p) for p in method.head.parameters()}
    assert params["fake_score"] == {id(p) for p in method.fake_trainable.values()}
    assert all("lora_" in k for k in (*method.trainable, *method.fake_trainable))
    teacher = _snapshot(models.unet.named_parameters())
    student, fake = _snapshot(method.student.named_parameters()), _snapshot(method.fake.named_parameters())
    head = _snapshot(method.head.named_parameters())
    calls = []
    original = method.compute
    method.compute = lambda phase, batch, cache: calls.append((phase, method.round)) or original(phase, batch, cache)
    trainer.fit()
    assert calls == [("generator", 0), ("discriminator", 0), ("fake_score", 0), ("discriminator", 1),
                     ("fake_score", 1)]
    steps = {ph: {int(s["step"]) for s in trainer.optimizers[ph].state.values()} for ph in method.phases}
    assert steps == {"generator": {1}, "discriminator": {2}, "fake_score": {2}}  # --critic-steps 2
    assert not _changed(teacher, models.unet.named_parameters())  # the video teacher = encoder = 2D teacher
    changed = _changed(student, method.student.named_parameters())
    assert changed and all("lora_" in k for k in changed)
    assert _changed(head, method.head.named_parameters()) == set(head)
    fake_changed = _changed(fake, method.fake.named_parameters())
    assert fake_changed and all("lora_" in k for k in fake_changed)
    row = read_metrics(tmp_path / "run")[0]
    assert all(math.isfinite(row[k]) for k in ("loss/adm", "loss/sdm", "loss/d", "loss/fake_score", "loss/g_total"))


def test_generator_learning_rates_follow_the_paper(tmp_path, models):
    cfg = tiny_config(tmp_path, train_modules="temporal_res_block", motion_lr_scale=5.0, lr=4e-6, **SMALL)
    method = AVDM2(cfg, models, 2, torch.Generator())
    spatial, motion = method.parameters("generator")
    assert (spatial["lr"], motion["lr"]) == (4e-6, pytest.approx(2e-5))
    names = {id(p): n for n, p in method.trainable.items()}
    assert all("temporal" in names[id(p)] for p in motion["params"])
    assert not any("temporal" in names[id(p)] for p in spatial["params"])
    assert method.parameters("fake_score")[0]["lr"] == cfg.disc_lr


def test_resume_reproduces_the_uninterrupted_run(tmp_path, models):
    cfg = tiny_config(tmp_path, max_steps=3, **SMALL)
    straight = tmp_path / "straight"
    make_trainer(cfg, straight, models=models)[0].fit()
    interrupted = tmp_path / "interrupted"
    make_trainer(tiny_config(tmp_path, max_steps=2, **SMALL), interrupted, models=models)[0].fit()
    resumed, _, _ = make_trainer(cfg, interrupted, models=models)
    resumed.resume(latest_checkpoint(interrupted / "stage2"))
    resumed.fit()
    keys = ("loss/g_total", "loss/adm", "loss/sdm", "loss/d", "loss/fake_score")
    rows = lambda d: [tuple(r[k] for k in ("step", *keys)) for r in read_metrics(d)]  # noqa: E731
    assert rows(interrupted) == rows(straight) and len(rows(straight)) == 3
    assert all(math.isfinite(v) for row in rows(straight) for v in row)
    assert rows(straight)[-1][3] != 0.0  # the fake score has moved off the teacher: SDM has a gradient


# -- the command line: train, then sample at k steps --------------------------------------------------------
def test_cli_train_then_sample_at_the_runs_student_steps(tmp_path, monkeypatch):
    from prodistill.cli import main
    import prodistill.sampling as sampling

    run = tmp_path / "avdm2"
    flags = ["--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--lora-rank", "2", "--num-timesteps",
             "10", "--device", "cpu", "--disc-head-channels", "8", "--sdm-frames", "2", "--student-steps", "3",
             "--train-modules", "conv_out"]
    result = CliRunner().invoke(main, ["train", "--method", "avdm2", "--out", str(run), "--max-steps", "1", *flags])
    assert result.exit_code == 0, result.output
    ckpt = run / "stage2" / "ckpt-0000001"
    assert {p.stem for p in ckpt.glob("*.safetensors")} == {"student", "discriminator", "fake_score"}
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    steps = []
    monkeypatch.setattr(sampling, "sample_student", lambda d, shape, k, *a, **kw: steps.append(k) or
                        sample_student(d, shape, k, *a, **kw))
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(run), "--image", str(image), "--out",
                                       str(tmp_path / "s.mp4"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert steps == [3]  # the run's --student-steps; its --train-modules weights load (stage from the checkpoint)
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(run), "--image", str(image), "--out",
                                       str(tmp_path / "t.mp4"), "--device", "cpu", "--tts"])
    assert result.exit_code != 0 and "sample it without --tts" in result.output

    from export.run import merged_student
    from prodistill.config import build_config

    cfg = build_config({}, run / "config.yaml")
    merged = merged_student(cfg, build_models(cfg, torch.device("cpu")), ckpt, "student")  # what export writes
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"sdm_frames": 5}, "--sdm-frames"),
    ({"student_steps": 5}, "--student-steps"),
    ({"critic_steps": 0}, "--critic-steps"),
    ({"adm_t_min": 0.6}, "--adm-t-min"),
    ({"image_teacher": "/no/such/sd"}, "--image-teacher"),
])
def test_bad_flags_are_one_sentence_before_any_model(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **{**SMALL, **overrides})


def test_fsdp_is_refused_before_any_model(tmp_path):
    AVDM2.check(tiny_config(tmp_path, **SMALL, parallel="ddp"))
    with pytest.raises(ValueError, match="--parallel ddp"):
        AVDM2.check(tiny_config(tmp_path, **SMALL, parallel="fsdp"))


def test_paper_defaults_apply_to_avdm2_only(tmp_path):
    from prodistill.config import build_config

    full = build_config({"method": "avdm2", "preset": "svd-xt"})
    assert (full.lr, full.disc_lr, full.warmup_steps, full.weight_decay) == (4e-6, 2e-5, 500, 0.01)
    assert (full.student_steps, full.critic_steps, full.adm_t_max, full.sdm_t_min, full.sdm_t_max) == (4, 2, 0.5, 0.2, 0.98)
    osv = build_config({"method": "osv", "preset": "svd-xt"})
    assert (osv.lr, osv.weight_decay, osv.warmup_steps) == (5e-6, 0.0, 100)
    mcm = build_config({"method": "mcm", "preset": "svd-xt"})  # one METHOD_DEFAULTS table serves both methods
    assert (mcm.lr, mcm.disc_lr, mcm.weight_decay, mcm.warmup_steps) == (5e-6, 5e-5, 0.0, 100)
    assert build_config({"method": "avdm2", "preset": "svd-xt", "lr": 1e-5}).lr == 1e-5  # a flag still wins


# -- --image-teacher: a diffusers Stable Diffusion UNet as the 2D teacher -----------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion folder written by the real classes' save_pretrained (random weights)."""
    import json

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8).save_pretrained(root / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    (root / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8).save_pretrained(root / "tokenizer")
    return root


def test_image_teacher_is_the_sd_unet_as_an_edm_denoiser(sd_folder, models):
    from prodistill.models.image_teacher import DiffusersImageTeacher

    teacher = models.image_teacher(str(sd_folder))
    assert isinstance(teacher, DiffusersImageTeacher) and teacher.context.shape == (1, 8, 32)
    table = teacher.log_sigmas.exp()
    sigma = torch.stack([table[0] / 2, table[500], table[-1] * 3]).float()
    torch.testing.assert_close(teacher.timestep(sigma), torch.tensor([0.0, 500.0, 999.0]), rtol=0, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 3, 4, 4, 4, generator=g), torch.tensor([0.5, 4.0])
    with torch.no_grad():
        got = teacher.denoiser(teacher.net)(x, sigma, None)
        s = sigma.repeat_interleave(3)
        c_in = (1 / (s**2 + 1).sqrt()).view(-1, 1, 1, 1)
        eps = teacher.net(c_in * x.flatten(0, 1), teacher.timestep(s), encoder_hidden_states=teacher.context.expand(6, -1, -1)).sample
    torch.testing.assert_close(got, (x.flatten(0, 1) - s.view(-1, 1, 1, 1) * eps).view(x.shape))  # ε-prediction


def test_avdm2_trains_against_an_image_teacher(sd_folder, tmp_path, models):
    cfg = tiny_config(tmp_path, max_steps=1, image_teacher=str(sd_folder), **SMALL)
    trainer, method, _ = make_trainer(cfg, tmp_path / "run", models=models)
    sd = _snapshot(method.fake.named_parameters())
    assert all("lora_" in k for k in method.fake_trainable) and "conv_in.weight" in sd  # SD UNet + LoRA
    assert method.teacher_2d.net is not models.unet
    teacher = _snapshot(method.teacher_2d.net.named_parameters())
    trainer.fit()
    changed = _changed(sd, method.fake.named_parameters())
    assert changed and all("lora_" in k for k in changed)
    assert not _changed(teacher, method.teacher_2d.net.named_parameters())
    assert math.isfinite(read_metrics(tmp_path / "run")[0]["loss/sdm"])


def test_image_teacher_folders_are_checked(sd_folder, tmp_path):
    import shutil

    from prodistill.models.svd import WeightsError

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ValueError, match="lacks text_encoder/config.json"):
        tiny_config(tmp_path, image_teacher=str(broken), **SMALL)
    other_vae = tmp_path / "sdxl"
    shutil.copytree(sd_folder, other_vae)
    (other_vae / "vae").mkdir()
    (other_vae / "vae" / "config.json").write_text('{"scaling_factor": 0.13025}')
    with pytest.raises(WeightsError, match="share the latent space"):
        build_models(tiny_config(tmp_path, **SMALL), torch.device("cpu")).image_teacher(str(other_vae))
