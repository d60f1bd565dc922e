"""GPU checks (marker `gpu`; skipped without CUDA). Run on the GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import RandomClips, tiny_config
from prodistill.methods import build_method
from prodistill.training.logger import MetricsLogger, read_metrics
from prodistill.training.run import build_models
from prodistill.training.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [1, 2])
def test_osv_bf16_steps_on_cuda(tmp_path, stage):
    """Two bf16 OSV steps on CUDA run with finite losses and report peak memory."""
    for device, dtype in (("cuda", "bf16"),):
        cfg = tiny_config(tmp_path, device=device, dtype=dtype, max_steps=2, out=str(tmp_path / device))
        dev = torch.device(device)
        models = build_models(cfg, dev)
        gen = torch.Generator(dev).manual_seed(0)
        torch.manual_seed(1000 * stage)
        method = build_method(cfg, models, stage, gen)
        run_dir = tmp_path / device
        run_dir.mkdir()
        trainer = Trainer(cfg, method, RandomClips(1, cfg.frames, 32), stage, run_dir / "s", 2, gen,
                          MetricsLogger(run_dir))
        trainer.fit()
        rows = read_metrics(run_dir)
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))
        assert rows[-1]["perf/peak_mem_gib"] > 0


def test_teacher_denoiser_bf16_cuda_matches_fp32_cpu(tmp_path):
    from prodistill.diffusion.solvers import bind

    cfg = tiny_config(tmp_path)
    cpu = build_models(cfg, torch.device("cpu"))
    gpu = build_models(tiny_config(tmp_path, dtype="bf16"), torch.device("cuda"))
    pixels = torch.rand(1, cfg.frames, 3, 32, 32) * 2 - 1
    cond = cpu.condition(pixels[:, 0], cfg.frames, cfg.fps, torch.Generator().manual_seed(0))
    x = torch.randn(1, cfg.frames, 4, 4, 4) * 3
    sigma = torch.tensor([3.0])
    ref = bind(cpu.denoiser(cpu.teacher), cond)(x, sigma)
    cond_gpu = type(cond)(*(t.cuda() for t in cond.astuple()))
    out = bind(gpu.denoiser(gpu.teacher), cond_gpu)(x.cuda(), sigma.cuda()).cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
