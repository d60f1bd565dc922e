"""The analytic quality benchmark: the exact denoiser is exact, the teacher's solver reaches the truth, the
metrics behave, and a tiny run of the whole benchmark writes every row."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from click.testing import CliRunner

from prodistill.bench import bench
import prodistill.bench.quality as quality_mod
from prodistill.bench.analytic import ClassCondition, MixtureSpec, VideoGaussianMixture
from prodistill.bench.quality import (CLAIMS, TEACHER_STEPS, BenchSettings, Evaluator, energy_distance,
                                      run_quality_bench, save_plot, sliced_wasserstein)
from prodistill.diffusion.edm import karras_sigmas
from prodistill.diffusion.solvers import edm_euler_sample

SMALL = MixtureSpec(frames=3, channels=1, height=2, width=2, classes=2, modes_per_class=2)
TINY_RUN = BenchSettings("test", batch_size=4, stage1_steps=2, stage2_steps=2, eval_samples=48, hidden=32,
                         disc_head_channels=8, projections=8, noise_pairs=2)


def _brute_force_posterior_mean(mix: VideoGaussianMixture, x: torch.Tensor, sigma: float, labels) -> torch.Tensor:
    """E[x0 | x] from the dense D×D covariances, component by component (no structure used)."""
    f, m = mix.spec.frames, x[0].numel() // mix.spec.frames
    corr = mix.frame_basis @ torch.diag(mix.frame_eigvals) @ mix.frame_basis.T
    out = []
    for xb, label in zip(x.double().flatten(1), labels):
        log_p, means = [], []
        for k in range(mix.spec.components):
            if label >= 0 and mix.component_class[k] != label:
                continue
            cov0 = mix.variances[k] * torch.kron(corr, torch.eye(m, dtype=torch.float64))
            cov = cov0 + sigma**2 * torch.eye(f * m, dtype=torch.float64)
            mu = mix.means[k].flatten()
            log_p.append(torch.distributions.MultivariateNormal(mu, cov).log_prob(xb))
            means.append(mu + cov0 @ torch.linalg.solve(cov, xb - mu))
        out.append((torch.softmax(torch.stack(log_p), 0)[:, None] * torch.stack(means)).sum(0))
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("sigma", [0.002, 0.3, 2.0, 80.0])
def test_exact_denoiser_matches_brute_force_posterior_and_tweedie(sigma):
    mix = VideoGaussianMixture(SMALL, seed=3)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, -1, 1, -1, 0])
    x0, _ = mix.sample(labels.clamp(min=0), g)
    x = x0.double() + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sig = torch.full((6,), sigma, dtype=torch.float64)
    denoised = mix(x, sig, ClassCondition(labels))
    torch.testing.assert_close(denoised, _brute_force_posterior_mean(mix, x, sigma, labels), rtol=1e-7, atol=1e-7)
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(mix.log_prob(x, sig, labels).sum(), x)  # Tweedie: D = x + σ²∇log p_σ
    torch.testing.assert_close(denoised, (x + sigma**2 * score).detach(), rtol=1e-7, atol=1e-7)


def test_exact_samples_follow_the_density():
    mix = VideoGaussianMixture(MixtureSpec(), seed=0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, mix.spec.classes, (2000,), generator=g)
    x, comp = mix.sample(labels, g)
    assert (mix.assign(x) == comp).float().mean() > 0.99  # well-separated modes, sampled where the density says
    d = x[0].numel()
    maha = mix.mahalanobis2(x, comp)
    assert abs(float(maha.mean()) - d) < 4 * math.sqrt(2 * d / len(maha))  # χ²_d mean


def test_teacher_25_step_ode_lands_on_the_truth():
    mix = VideoGaussianMixture(MixtureSpec(), seed=0)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, mix.spec.classes, (600,), generator=g)
    reference, _ = mix.sample(labels, g)
    noise = torch.randn(reference.shape, generator=g)
    teacher = lambda x, s: mix(x, s, ClassCondition(labels))  # noqa: E731
    distance = {steps: energy_distance(edm_euler_sample(teacher, noise, karras_sigmas(steps)), reference)
                for steps in (1, 25)}
    assert distance[25] < 0.05 * distance[1]
    assert distance[25] < 0.05 * energy_distance(noise, reference)


def test_metrics_are_zero_for_exact_samples_and_grow_with_a_shift():
    mix = VideoGaussianMixture(MixtureSpec(), seed=0)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, mix.spec.classes, (800,), generator=g)
    reference, _ = mix.sample(labels, g)
    other, _ = mix.sample(labels, g)
    evaluator = Evaluator(mix, labels, reference, projections=64, generator=g)
    same, shifted = evaluator(other), evaluator(other + 0.5)
    assert abs(same["energy"]) < 0.03 and shifted["energy"] > 1.0
    assert same["sliced_w2"] < 0.1 < 0.4 < shifted["sliced_w2"]
    assert same["modes_covered"] == same["modes"] and same["in_mode"] > 0.97 and same["class_acc"] == 1.0
    assert shifted["in_mode"] < 0.5
    collapsed = evaluator(mix.means[mix.assign(other)].view_as(other).float())  # every sample at its mode's mean
    assert collapsed["energy"] > 0.3 and collapsed["in_mode"] == 1.0  # too sharp: in-mode passes, energy sees it
    assert sliced_wasserstein(reference, reference, evaluator.directions) == 0.0


def _run_cli(tmp_path, monkeypatch, extra=()):
    monkeypatch.setattr(quality_mod, "settings_for", lambda quick: TINY_RUN)
    out = tmp_path / "q.json"
    result = CliRunner().invoke(bench, ["quality", "--quick", "--json", str(out), "--seed", "1", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def test_tiny_bench_run_writes_every_row_and_claim(tmp_path, monkeypatch):
    data, output = _run_cli(tmp_path, monkeypatch)
    ids = [r["id"] for r in data["rows"]]
    expected = (["exact"] + [f"teacher/{s}" for s in TEACHER_STEPS] + ["avdm2-init/4"]
                + ["lcm/1", "lcm/2", "lcm/4", "osv/1", "osv/1+tts", "osv/2", "osv-m1/1", "osv-m1/1+tts",
                   "osv-no-stage1/1", "osv-no-stage1/1+tts", "mcm/1", "mcm/2", "mcm/4",
                   "avdm2/4"])
    assert ids == expected
    assert [c["claim"] for c in data["claims"]] == [c[0] for c in CLAIMS]
    assert all(math.isfinite(r["energy"]) for r in data["rows"])
    assert "energy of exact vs exact" in output
    if "plot skipped" not in output:
        assert (tmp_path / "q.png").stat().st_size > 0


def test_bench_is_deterministic_and_plot_skips_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    data, output = _run_cli(tmp_path, monkeypatch)
    assert "plot skipped: matplotlib is not installed" in output and not (tmp_path / "q.png").exists()
    assert save_plot(data, tmp_path / "p.png") is None
    subset = run_quality_bench(TINY_RUN, seed=1, echo=lambda line: None, students=("lcm", "mcm"))
    by_id = {r["id"]: r for r in data["rows"]}
    assert [r["id"] for r in subset["rows"]] == (["exact"] + [f"teacher/{s}" for s in TEACHER_STEPS]
                                                 + ["lcm/1", "lcm/2", "lcm/4", "mcm/1", "mcm/2", "mcm/4"])
    assert subset["rows"] == [by_id[r["id"]] for r in subset["rows"]]  # deterministic, whoever else trains
    assert {c["row"] for c in subset["claims"]} == {"mcm/1", "mcm/2", "mcm/4"}
    refused = CliRunner().invoke(bench, ["quality", "--students", "lcm,dmd"])
    assert refused.exit_code != 0 and "unknown student(s) dmd" in refused.output


def test_set_overrides_reach_every_students_config(tmp_path):
    """`bench quality --set KEY=VALUE` (and --cm-scale) reach the students' training config, typed as YAML; unknown
    keys and the options the benchmark fixes itself are one sentence."""
    from dataclasses import replace

    from prodistill.bench.analytic import MixtureSpec
    from prodistill.bench.quality import QUICK, _config, parse_overrides

    pairs = parse_overrides(("huber_c=0.01", "ema-decay=0.99"))
    assert pairs == (("huber_c", 0.01), ("ema_decay", 0.99))
    settings = replace(QUICK, overrides=pairs, cm_scale=10.0)
    cfg = _config(settings, MixtureSpec(), 0, tmp_path, "lcm", 1, 10)
    assert (cfg.huber_c, cfg.ema_decay, cfg.cm_scale) == (0.01, 0.99, 10.0)
    for bad, message in (("nokey=1", "training option"), ("seed=3", "sets seed itself"),
                         ("cm_scale=4", "use --cm-scale")):
        with pytest.raises(ValueError, match=message):
            parse_overrides((bad,))


def test_set_values_of_the_wrong_type_or_range_are_one_sentence_before_the_benchmark(tmp_path, monkeypatch):
    """A bad --set value is refused when the students' configs are built, before the teacher rows (it was a
    traceback); a value the benchmark itself sets otherwise (lr) is replaced, guidance is not open to --set."""
    from dataclasses import replace

    from prodistill.bench.quality import QUICK, _config, parse_overrides

    monkeypatch.setattr(quality_mod, "_run", lambda *a, **k: pytest.fail("the benchmark started"))
    for bad, message in (("ema_decay=5", "--ema-decay must be in [0, 1)"),
                         ("huber_c=abc", "huber_c (--huber-c) must be a number or null, got 'abc'"),
                         ("lora_rank=x", "lora_rank (--lora-rank) must be a whole number"),
                         ("guidance_max=3", "the benchmark sets guidance_max itself")):
        result = CliRunner().invoke(bench, ["quality", "--quick", "--json", str(tmp_path / "q.json"), "--set", bad])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "q.json").exists()
    cfg = _config(replace(QUICK, overrides=parse_overrides(("lr=1e-3",))), MixtureSpec(), 0, tmp_path, "lcm", 1, 10)
    assert cfg.lr == 0.001


@pytest.mark.parametrize("args, message", [
    (["--json", "FILE/q.json"], "is a file, not a folder; choose another --json"),
    (["--plot", "p.txt"], "--plot p.txt: give a file path ending in .png"),
    (["--json", "q", "--plot", "FILE/p.png"], "is a file, not a folder; choose another --plot"),
])
def test_bad_output_paths_are_refused_before_the_benchmark(tmp_path, args, message, monkeypatch):
    monkeypatch.setattr(quality_mod, "_run", lambda *a, **k: pytest.fail("the benchmark started"))
    (tmp_path / "file").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
    result = CliRunner().invoke(bench, ["quality", "--quick", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_a_signal_stops_the_benchmark_with_the_rows_so_far_and_no_resume_advice(tmp_path, monkeypatch):
    """SIGINT while a student trains: the Trainer finishes its step, the rows measured before are written with the
    reason, exit status 130, one line that says so and nothing about --resume (the checkpoints were temporary)."""
    import os
    import signal

    from prodistill.training.trainer import Trainer

    step = Trainer.train_step

    def interrupted_step(self, micro):
        os.kill(os.getpid(), signal.SIGINT)  # the Trainer's handler only flags it: this step finishes
        return step(self, micro)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    monkeypatch.setattr(quality_mod, "settings_for", lambda quick: TINY_RUN)
    out = tmp_path / "q.json"
    result = CliRunner().invoke(bench, ["quality", "--quick", "--json", str(out), "--students", "lcm"])
    assert result.exit_code == 130, result.output
    assert f"bench quality stopped by a signal while training LCM; the rows measured before it are in {out}" \
        in result.output
    assert "--resume" not in result.output and "Traceback" not in result.output
    data = json.loads(out.read_text())
    assert data["interrupted"] == "stopped by a signal while training LCM"
    assert [r["id"] for r in data["rows"]] == ["exact"] + [f"teacher/{s}" for s in TEACHER_STEPS]


def test_ctrl_c_outside_training_is_one_line_and_status_130(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality_mod, "_run", interrupt)
    result = CliRunner().invoke(bench, ["quality", "--quick", "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 130 and "bench quality stopped by Ctrl-C; nothing was written" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "q.json").exists()
