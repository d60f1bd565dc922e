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


def test_graphed_teacher_solve_equals_eager(tmp_path):
    """The CUDA-graph replay of the m-step guided solve computes what the eager solve computes, on fresh inputs
    each call (the static buffers are refilled), for compiled (inductor) and eager teacher regions."""
    from prodistill.accel import Speedups, accelerate
    from prodistill.accel.graphs import GraphedSolve
    from prodistill.diffusion.solvers import frame_guidance
    from prodistill.methods.consistency import solver_path

    torch._dynamo.reset()
    cfg = tiny_config(tmp_path, device="cuda", dtype="bf16", solver_steps=3)
    dev = torch.device("cuda")
    models = build_models(cfg, dev)
    method = build_method(cfg, models, 2, torch.Generator(dev).manual_seed(0))
    eager = method.teacher_solve
    accelerate(method, models, Speedups(compile="teacher", cuda_graphs=True,
                                        cache_dir=tmp_path / "cache"))
    assert isinstance(method.teacher_solve, GraphedSolve)
    gen = torch.Generator(dev).manual_seed(1)
    for _ in range(3):
        pixels = torch.rand(2, cfg.frames, 3, 32, 32, device=dev, generator=gen) * 2 - 1
        x0, cond = models.prepare_batch({"pixels": pixels}, cfg.fps, gen)
        n = torch.randint(0, cfg.num_timesteps - 3, (2,), device=dev, generator=gen)
        path = solver_path(method.grid, n, 3)
        x = x0 + path[:, :1, None, None, None] * torch.randn(x0.shape, device=dev, generator=gen)
        w = frame_guidance(1.0, 3.0, 2, cfg.frames, dev)
        want = eager(x, path, cond, w)
        got = method.teacher_solve(x, path, cond, w)
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert len(method.teacher_solve.graphs) == 1  # one capture, replayed


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphed_student_forward_and_backward_equal_eager(tmp_path, dtype):
    """The student's forward and backward replayed as CUDA graphs give the eager output and LoRA gradients on fresh
    inputs each call (fp32: same kernels, tight; bf16 under autocast: bf16 tolerance)."""
    from prodistill.accel.graphs import GraphedTrainCall

    cfg = tiny_config(tmp_path, device="cuda", dtype=dtype)
    dev = torch.device("cuda")
    models = build_models(cfg, dev)
    method = build_method(cfg, models, 2, torch.Generator(dev).manual_seed(0))
    graphed = GraphedTrainCall(method.student_d, method.trainable.values)
    gen = torch.Generator(dev).manual_seed(1)
    tol = 1e-4 if dtype == "fp32" else 2e-2
    for _ in range(3):
        pixels = torch.rand(2, cfg.frames, 3, 32, 32, device=dev, generator=gen) * 2 - 1
        x0, cond = models.prepare_batch({"pixels": pixels}, cfg.fps, gen)
        sigma = torch.rand(2, device=dev, generator=gen) * 5 + 0.1
        x = x0 + sigma.view(-1, 1, 1, 1, 1) * torch.randn(x0.shape, device=dev, generator=gen)
        results = []
        for fn in (method.student_d, graphed):
            out = fn(x, sigma, cond)
            out.float().square().mean().backward()
            results.append((out.detach().float(), {k: p.grad.clone() for k, p in method.trainable.items()
                                                   if p.grad is not None}))
            del out  # an eager graph left alive would hold the parameters' gradient accumulators: no capture then
            for p in method.trainable.values():
                p.grad = None
        (want, want_grads), (got, got_grads) = results
        assert ((got - want).norm() / want.norm()).item() < tol
        assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
        # the cross-attention's query/key factors have an exactly zero gradient (a softmax over one key): only
        # rounding noise (~1e-10 on the H100), so each gradient is compared against its own norm or, where smaller,
        # 1e-3 of the largest gradient's
        floor = 1e-3 * max(g.norm() for g in want_grads.values())
        for k, g in want_grads.items():
            assert ((got_grads[k] - g).norm() / torch.maximum(g.norm(), floor)).item() < 5 * tol, k
    assert len(graphed.graphs) == 1  # one signature: captured once, replayed


@pytest.mark.parametrize("workers", [0, 4])
def test_compiled_graphed_step_tracks_eager_losses(tmp_path, workers):
    """Three OSV stage-2 steps with inductor regions, the graphed solve and EMA target and the exact rewrites give
    the eager bf16 losses (bf16 tolerance: different kernels and fusion orders); just in time (0 workers) and
    ahead of time in 4 background processes, where no variant may fall back. Ahead of time, a one-step run first
    fills the cache (its steps run eagerly while the variants compile), so that the compared run is compiled from
    its first step."""
    from prodistill.accel import Speedups
    from prodistill.accel.graphs import GraphedCall, GraphedTrainCall
    from prodistill.bench.train import precompile_stats, precompiler

    torch._dynamo.reset()
    losses = {}
    fast = Speedups(compile="all", cuda_graphs=True, graph_ema=True, graph_train=True, split_cfg=True,
                    rewrites=True, cache_dir=tmp_path / "cache", compile_workers=workers)
    runs = (("eager", Speedups(), 3), *((("prime", fast, 1),) if workers else ()), ("fast", fast, 3))
    for name, speedups, steps in runs:
        cfg = tiny_config(tmp_path, device="cuda", dtype="bf16", max_steps=steps, out=str(tmp_path / name))
        method, gen = _accelerated_osv_stage2(cfg, speedups)
        assert isinstance(method.ema_d, GraphedCall) == (speedups is fast)  # the EMA target's forward graphed too
        assert isinstance(method.student_d, GraphedTrainCall) == (speedups is fast)  # and the student's passes
        run_dir = tmp_path / name
        run_dir.mkdir()
        Trainer(cfg, method, RandomClips(1, cfg.frames, 32), 2, run_dir / "s", steps, gen, MetricsLogger(run_dir)).fit()
        losses[name] = [r["loss/g_total"] for r in read_metrics(run_dir)]
        if name == "prime":
            precompiler([method.student]).flush()
    if workers:
        stats = precompile_stats([method.student])
        assert stats["compiled"] > 10 and stats["failed"] == 0 and stats["loaded"] == stats["compiled"]
    assert len(losses["fast"]) == len(losses["eager"]) == 3
    for a, b in zip(losses["fast"], losses["eager"]):
        assert a == pytest.approx(b, rel=3e-2)


def test_graphed_step_follows_a_resolution_switch(tmp_path):
    """OSV stage 2 with the teacher solve, the EMA target and the student's passes graphed, 32x32 then 48x32 from
    step 2 (fp32): the switch releases the first size's graphs and captures the new size's, and the losses equal the
    eager run's."""
    from prodistill.accel import Speedups, release_graphs

    losses = {}
    graphed = Speedups(cuda_graphs=True, graph_ema=True, graph_train=True)
    for name, speedups in (("eager", Speedups()), ("graphed", graphed)):
        cfg = tiny_config(tmp_path, device="cuda", max_steps=4, resolution_schedule="2:48x32",
                          out=str(tmp_path / name))
        method, gen = _accelerated_osv_stage2(cfg, speedups)
        run_dir = tmp_path / name
        run_dir.mkdir()
        Trainer(cfg, method, RandomClips(1, cfg.frames, 32), 2, run_dir / "s", 4, gen, MetricsLogger(run_dir),
                loader_at=lambda size: RandomClips(1, cfg.frames, size), on_resize=lambda: release_graphs(method)).fit()
        losses[name] = [r["loss/g_total"] for r in read_metrics(run_dir)]
        if name == "graphed":
            shapes = [key[1][0] for key in method.teacher_solve.graphs]  # (structure, first input's shape, ...)
            assert shapes == [torch.Size([1, cfg.frames, 4, 4, 6])], shapes  # only the 48x32 graph is left
            assert [key[1][0] for key in method.student_d.graphs] == shapes
    assert len(losses["graphed"]) == 4
    for a, b in zip(losses["graphed"], losses["eager"]):
        assert a == pytest.approx(b, rel=1e-4)


def _accelerated_osv_stage2(cfg, speedups):
    """(method, generator): OSV stage 2 built on CUDA as `prodistill train` seeds it, with `speedups` applied."""
    from prodistill.accel import accelerate

    models = build_models(cfg, torch.device("cuda"))
    gen = torch.Generator(models.device).manual_seed(0)
    torch.manual_seed(2000)
    method = build_method(cfg, models, 2, gen)
    accelerate(method, models, speedups)
    return method, gen


def test_temporal_gemm_rewrite_compiled_matches_conv3d(tmp_path):
    """The experimental temporal-conv GEMM rewrite inside an inductor-compiled temporal res-block (bf16, 64 channels,
    8 frames): at 16x16 (the GEMM form) and 24x24 (above the crossover: cuDNN's Conv3d) the forward and the input and
    weight gradients match the uncompiled Conv3d block within bf16 rounding."""
    from diffusers.models.resnet import TemporalResnetBlock

    from prodistill.accel.compile import compile_fn, use_cache_dir
    from prodistill.accel.rewrites import TemporalGemmConv3d, apply_rewrites

    torch._dynamo.reset()
    use_cache_dir(tmp_path / "cache")
    torch.manual_seed(0)
    block = TemporalResnetBlock(64, 64, temb_channels=32).cuda().to(torch.bfloat16)
    temb = torch.randn(1, 8, 32, device="cuda", dtype=torch.bfloat16)

    def run(forward, x):
        block.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = forward(xg, temb)
        out.float().square().mean().backward()
        return out.float(), xg.grad.float(), block.conv1.weight.grad.float()

    inputs = [torch.randn(1, 64, 8, hw, hw, device="cuda", dtype=torch.bfloat16) for hw in (16, 24)]
    want = [run(block.forward, x) for x in inputs]
    assert apply_rewrites([block], temporal_gemm=True)["temporal_gemm"] == 2
    assert type(block.conv1) is TemporalGemmConv3d
    compiled = compile_fn(type(block).forward.__get__(block), "inductor")
    for w, x in zip(want, inputs):
        for g, r in zip(run(compiled, x), w):
            assert ((g - r).norm() / r.norm()).item() < 2e-2
