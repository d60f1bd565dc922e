"""The training-step speed-ups on CPU: regions compile without graph breaks, the compiled step computes the
eager step's losses, the EMA swap is honoured by compiled regions, resume stays exact, and the switches
refuse what cannot work. (CUDA graphs and inductor on the GPU: tests/test_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from conftest import RandomClips, make_trainer, tiny_config
from prodistill.accel import SpeedupError, Speedups, accelerate, method_networks
from prodistill.accel.compile import find_regions
from prodistill.training.checkpoint import latest_checkpoint
from prodistill.training.logger import read_metrics

UNET_REGIONS = {"SpatioTemporalResBlock", "TransformerSpatioTemporalModel", "Downsample2D", "Upsample2D"}


def _losses(run_dir):
    return [(r["step"], r["loss/g_total"], r.get("loss/d")) for r in read_metrics(run_dir)]


def test_regions_cover_unet_blocks_dinov2_and_heads(tmp_path):
    cfg = tiny_config(tmp_path)
    _, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)
    names = [type(m).__name__ for m in find_regions(method_networks(osv, models))]
    assert UNET_REGIONS <= set(names)
    assert {"Dinov2Layer", "Dinov2Embeddings", "LatentUpsampler", "DiscriminatorHeads"} <= set(names)
    # the tiny UNet has 8 res-blocks and 4 attention models; teacher and student each bring theirs
    assert names.count("SpatioTemporalResBlock") == 16 and names.count("TransformerSpatioTemporalModel") == 8
    assert names.count("Dinov2Layer") == 4


def test_same_shape_regions_share_one_compiled_graph():
    """Two res-blocks of one class and shape, and two attention models given one shared processor, must
    trace once each: dynamo's cache sits on the class's forward, so per-instance compiles would show here."""
    from diffusers import UNetSpatioTemporalConditionModel

    from prodistill.accel.compile import compile_regions
    from prodistill.models.presets import TINY

    traced = []

    def count(gm, inputs):
        traced.append(gm)
        return gm.forward

    torch._dynamo.reset()
    unet = UNetSpatioTemporalConditionModel(**dict(TINY.unet, layers_per_block=2)).eval()
    assert len({id(p) for p in unet.attn_processors.values()}) > 1
    regions = compile_regions([unet], backend=count)
    assert len({id(p) for p in unet.attn_processors.values()}) == 1
    res_blocks = [m for m in regions if type(m).__name__ == "SpatioTemporalResBlock"]
    frames = TINY.unet["num_frames"]
    x = torch.randn(frames, 32, 8, 8)
    temb = torch.randn(frames, unet.time_embedding.linear_2.out_features)
    flags = torch.zeros(1, frames)
    first, second = res_blocks[0], res_blocks[1]  # down block 0: two 32→32 res-blocks at 8×8
    with torch.no_grad():
        first(x, temb, image_only_indicator=flags)
        n = len(traced)
        second(x, temb, image_only_indicator=flags)
        assert len(traced) == n == 1
        attn = [m for m in regions if type(m).__name__ == "TransformerSpatioTemporalModel"][:2]
        ctx = torch.randn(frames, 1, TINY.unet["cross_attention_dim"])
        for m in attn:
            m(x, encoder_hidden_states=ctx, image_only_indicator=flags)
        assert len(traced) == 2


@pytest.mark.parametrize("stage", [2])
def test_compiled_step_has_no_graph_break_and_matches_eager(tmp_path, stage):
    """fullgraph=True regions raise on any graph break, and the traced step must give the eager losses to the
    last bit (dynamo's eager backend replays the traced ops). Stage 2 runs every region in every variant
    (teacher, EMA target, student with grad, discriminator in both phases). Later tests reuse these traces."""
    cfg = tiny_config(tmp_path, max_steps=2)
    eager, _, models = make_trainer(cfg, tmp_path / "eager", stage=stage)
    eager.fit()
    compiled, method, _ = make_trainer(cfg, tmp_path / "compiled", stage=stage, models=models)
    accelerate(method, models, Speedups(compile="all", backend="eager"))
    compiled.fit()
    got, want = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert len(got) == 2 and got == want


def test_ema_target_swap_is_honoured_by_compiled_regions(tmp_path):
    """aot_eager: the functionalised graphs of the forward (with parameters as graph inputs) must read the
    values the EMA swap copies in."""
    cfg = tiny_config(tmp_path)
    _, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)
    with torch.no_grad():  # student θ and target θ⁻ differ
        for p in osv.trainable.values():
            p.add_(0.1 * torch.randn_like(p))
    pixels = next(RandomClips(1, cfg.frames, 32))
    x0, cond = models.prepare_batch(pixels, cfg.fps, torch.Generator().manual_seed(0))
    x, sigma = x0 + 2.0 * torch.randn_like(x0), torch.tensor([2.0])
    with torch.no_grad():
        eager_ema, eager_student = osv.ema_d(x, sigma, cond), osv.student_d(x, sigma, cond)
        accelerate(osv, models, Speedups(compile="all", backend="aot_eager"))
        compiled_student = osv.student_d(x, sigma, cond)  # compiled first with θ ...
        compiled_ema = osv.ema_d(x, sigma, cond)  # ... then called with θ⁻ swapped in
    assert not torch.allclose(eager_ema, eager_student, atol=1e-4)
    torch.testing.assert_close(compiled_student, eager_student, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_ema, eager_ema, rtol=1e-4, atol=1e-5)
    live = dict(osv.student.named_parameters())
    assert all(live[k].data_ptr() != v.data_ptr() for k, v in osv.ema.params.items())  # swapped back


def test_resume_with_compile_reproduces_the_uninterrupted_run(tmp_path):
    """Resume logic under compiled regions (dynamo's eager backend: the traced bytecode, eager kernels), so
    the losses must be equal to the last bit, as without compile."""
    cfg = tiny_config(tmp_path, max_steps=3)
    compiled = Speedups(compile="all", backend="eager")
    straight, method, models = make_trainer(cfg, tmp_path / "straight", stage=2)
    accelerate(method, models, compiled)
    straight.fit()
    first, method, _ = make_trainer(tiny_config(tmp_path, max_steps=2), tmp_path / "resumed", stage=2,
                                    models=models)
    accelerate(method, models, compiled)
    first.fit()
    second, method, _ = make_trainer(cfg, tmp_path / "resumed", stage=2, models=models)
    accelerate(method, models, compiled)
    second.resume(latest_checkpoint(tmp_path / "resumed" / "stage2"))
    second.fit()
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_switches_resolve_by_device_and_refuse_graphs_on_cpu(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = tiny_config(tmp_path)
    assert Speedups.from_config(auto, cpu).compile == "off" and not Speedups.from_config(auto, cpu).cuda_graphs
    on_gpu = Speedups.from_config(auto, cuda)
    assert on_gpu.compile == "all" and on_gpu.cuda_graphs
    assert Speedups.from_config(tiny_config(tmp_path, compile="teacher"), cuda).compile == "teacher"
    assert Speedups.from_config(tiny_config(tmp_path, compile="on"), cuda).compile == "all"
    forced = Speedups.from_config(tiny_config(tmp_path, compile="on", compile_cache=str(tmp_path / "c")), cpu)
    assert forced.compile == "all" and forced.cache_dir == tmp_path / "c"
    assert Speedups.from_config(auto, cuda).describe() == ("compile (all networks, inductor), CUDA graphs: teacher "
                                                           "solve + EMA target, exact rewrites, split CFG")
    assert on_gpu.graph_ema and not on_gpu.channels_last
    assert Speedups.from_config(tiny_config(tmp_path, channels_last=True), cpu).channels_last
    off = Speedups.from_config(tiny_config(tmp_path, compile="off", cuda_graphs="off"), cuda)
    assert off.compile == "off" and not off.cuda_graphs and off.describe() == "exact rewrites"
    assert Speedups().describe() == "none (eager)"
    # --split-cfg auto: on exactly when every network is compiled (the teacher then shares the EMA's variants)
    assert on_gpu.split_cfg and not off.split_cfg and not Speedups.from_config(auto, cpu).split_cfg
    assert not Speedups.from_config(tiny_config(tmp_path, compile="teacher"), cuda).split_cfg
    assert not Speedups.from_config(tiny_config(tmp_path, split_cfg="off"), cuda).split_cfg
    assert Speedups.from_config(tiny_config(tmp_path, split_cfg="on"), cpu).split_cfg
    assert tiny_config(tmp_path, split_cfg=True).split_cfg == "on"  # a config.yaml written before auto
    with pytest.raises(SpeedupError, match="--cuda-graphs on needs --device cuda"):
        Speedups.from_config(tiny_config(tmp_path, cuda_graphs="on"), cpu)


def _beside_plain(tmp_path, speedups: Speedups, rel: float):
    """Two 2-step OSV stage-2 runs on the same networks, without and with `speedups`, whose losses must agree
    within `rel`; returns the second run's (method, models), accelerated before it trained."""
    cfg = tiny_config(tmp_path, max_steps=2)
    plain, _, models = make_trainer(cfg, tmp_path / "plain", stage=2)
    plain.fit()
    fast, method, _ = make_trainer(cfg, tmp_path / "fast", stage=2, models=models)
    accelerate(method, models, speedups)
    fast.fit()
    for (_, a, b), (_, c, d) in zip(_losses(tmp_path / "fast"), _losses(tmp_path / "plain")):
        assert a == pytest.approx(c, rel=rel) and b == pytest.approx(d, rel=rel)
    return method, models


def test_grad_checkpointing_keeps_the_losses(tmp_path):
    method, models = _beside_plain(tmp_path, Speedups(grad_checkpointing=True), rel=1e-5)
    assert method.student.is_gradient_checkpointing and not models.unet.is_gradient_checkpointing


def test_cli_train_with_compile_on_cpu(tmp_path, monkeypatch):
    """`--compile on` end to end through `prodistill train` (the dynamo backend is swapped for a quick one)."""
    from click.testing import CliRunner

    from prodistill.cli import main

    monkeypatch.setenv("PRODISTILL_COMPILE_BACKEND", "eager")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--resolution", "32x32", "--frames", "4", "--max-steps", "1",
            "--device", "cpu", "--lora-rank", "2", "--disc-head-channels", "8", "--solver-steps", "2",
            "--num-timesteps", "10", "--compile", "on", "--compile-cache", str(tmp_path / "cache"),
            "--sample-every", "0", "--stage", "2", "--data", str(_one_clip(tmp_path))]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "stage2" / "ckpt-0000001").is_dir() and (tmp_path / "cache" / "inductor").is_dir()


def _one_clip(tmp_path):
    import numpy as np

    from prodistill.data.video import write_mp4

    frames = (np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    write_mp4(tmp_path / "clips" / "a.mp4", frames, 7.0)
    return tmp_path / "clips"


def test_teacher_only_compile_leaves_student_and_discriminator_eager(tmp_path):
    cfg = tiny_config(tmp_path)
    _, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)
    accelerate(osv, models, Speedups(compile="teacher", backend="eager"))
    assert all("forward" in vars(m) for m in find_regions([models.teacher]))
    assert not any("forward" in vars(m) for m in find_regions([osv.student, osv.disc]))


def test_no_speedups_leave_the_networks_eager(tmp_path):
    """Without speed-ups nothing is wrapped: no region's forward is replaced, the solve is the eager one."""
    cfg = tiny_config(tmp_path)
    _, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)
    accelerate(osv, models, Speedups())
    assert not any("forward" in vars(m) for m in find_regions(method_networks(osv, models)))
    assert type(osv.teacher_solve).__name__ == "TeacherSolve"


def test_student_built_after_compiling_the_teacher_gets_its_own_regions(tmp_path):
    """A student is a copy of the teacher: it must not inherit the teacher's compiled forwards (it would then
    run the teacher's modules, without LoRA, and get no gradient)."""
    cfg = tiny_config(tmp_path)
    _, first, models = make_trainer(cfg, tmp_path / "a", stage=2)
    accelerate(first, models, Speedups(compile="all", backend="eager"))
    _, second, _ = make_trainer(cfg, tmp_path / "b", stage=2, models=models)
    assert not any("forward" in vars(m) for m in second.student.modules())
    accelerate(second, models, Speedups(compile="all", backend="eager"))
    for region in find_regions([second.student]):
        assert region.forward._prodistill_owner is region


def test_svd_attention_shapes_at_512():
    """The SDPA table is measured at the shapes the step runs: SVD's spatial and temporal attention at the first
    three latent resolutions (64-dim heads, 5/10/20 heads), and DINOv2-S's 257 tokens."""
    from prodistill.accel.attention import svd_attention_shapes

    shapes = {s["name"]: s for s in svd_attention_shapes(batch=1, frames=14, width=512, height=512)}
    assert shapes["spatial 64x64"] == dict(name="spatial 64x64", batch=14, heads=5, seq=4096, head_dim=64)
    assert shapes["temporal 64x64"] == dict(name="temporal 64x64", batch=4096, heads=5, seq=14, head_dim=64)
    assert shapes["spatial 16x16"]["heads"] == 20 and shapes["spatial 16x16"]["seq"] == 256
    assert shapes["dinov2"] == dict(name="dinov2", batch=14, heads=6, seq=257, head_dim=64)
    assert len(shapes) == 7


def test_fused_ops_switch_reaches_the_upsampler_and_the_loss_and_is_refused_on_cpu(tmp_path):
    """accelerate flips every LatentUpsampler to the fused op and ops' process default (which the pseudo-Huber
    distance follows); a later run without --fused-ops flips both back. On CPU tensors the fused op takes its
    reference path, so the upsampler's output must stay the eager sequence's. (The Triton kernels themselves:
    tests/test_ops.py, `gpu`.)"""
    import ops._switch
    from prodistill.models.discriminator import LatentUpsampler

    cfg = tiny_config(tmp_path)
    _, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)
    ups = [m for n in method_networks(osv, models) for m in n.modules() if isinstance(m, LatentUpsampler)]
    assert ups and not any(m.fused for m in ups)
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        want = ups[0](x)
        try:
            accelerate(osv, models, Speedups(fused_ops=True))
            assert all(m.fused for m in ups) and ops._switch._default is True
            torch.testing.assert_close(ups[0](x), want, rtol=1e-5, atol=1e-5)
            accelerate(osv, models, Speedups())
            assert not any(m.fused for m in ups) and ops._switch._default is None
        finally:
            ops._switch.set_default(None)
    with pytest.raises(SpeedupError, match="--fused-ops needs --device cuda"):
        Speedups.from_config(tiny_config(tmp_path, fused_ops=True), torch.device("cpu"))


def test_split_cfg_reaches_the_teacher_solve_and_keeps_the_losses(tmp_path):
    """`--split-cfg` makes the teacher's guided solve call the teacher at batch B (not 2B) and gives the batched
    run's losses (same math; float rounding of the convolutions may differ in the last bits)."""
    cfg = tiny_config(tmp_path, max_steps=2)
    batched, method, models = make_trainer(cfg, tmp_path / "batched", stage=2)
    accelerate(method, models, Speedups())
    assert method.teacher_solve.split_cfg is False
    batched.fit()
    split, method, _ = make_trainer(cfg, tmp_path / "split", stage=2, models=models)
    accelerate(method, models, Speedups(split_cfg=True))
    assert method.teacher_solve.split_cfg is True
    batches = []
    teacher_d = method.teacher_solve.teacher_d
    method.teacher_solve.teacher_d = lambda x, sigma, cond: batches.append(x.shape[0]) or teacher_d(x, sigma, cond)
    split.fit()
    assert batches and set(batches) == {cfg.batch_size}
    for a, b in zip(_losses(tmp_path / "batched"), _losses(tmp_path / "split")):
        assert a == pytest.approx(b, rel=1e-4)


def test_the_tensors_an_ema_target_graph_reads_keep_their_storage(tmp_path):
    """A CUDA graph of the EMA target (`--cuda-graphs`) reads θ (the student's trainable parameters), θ⁻ and the
    swap buffer at the addresses of its capture: the optimiser step, the EMA update, a checkpoint load and the
    swap itself must all work in place, or the replays would read stale values."""
    cfg = tiny_config(tmp_path, max_steps=2)
    trainer, osv, models = make_trainer(cfg, tmp_path / "run", stage=2)

    def addresses(method):
        return ([p.data_ptr() for p in method.trainable.values()], [t.data_ptr() for t in method.ema.params.values()],
                [t.data_ptr() for t in method.ema._saved or []])

    x0, cond = models.prepare_batch(next(RandomClips(1, cfg.frames, 32)), cfg.fps, torch.Generator().manual_seed(0))
    with torch.no_grad():
        osv.ema_d(x0, torch.tensor([2.0]), cond)  # allocates the swap buffer, as the warm-up before a capture
    before, values = addresses(osv), [t.clone() for t in osv.ema.params.values()]
    trainer.fit()
    assert addresses(osv) == before
    assert any(not torch.equal(a, b) for a, b in zip(values, osv.ema.params.values()))  # θ⁻ did move
    again, fresh, _ = make_trainer(cfg, tmp_path / "run2", stage=2, models=models)
    with torch.no_grad():
        fresh.ema_d(x0, torch.tensor([2.0]), cond)
    before = addresses(fresh)
    again.resume(latest_checkpoint(tmp_path / "run" / "stage2"))
    assert addresses(fresh) == before


def test_graphed_call_flattens_and_rebuilds_its_arguments():
    from prodistill.accel.graphs import GraphedCall
    from prodistill.models.svd import SVDCondition

    cond = SVDCondition(*(torch.full((1,), float(i)) for i in range(len(SVDCondition.__dataclass_fields__))))
    x, sigma = torch.zeros(2), torch.ones(1)
    structure, tensors = GraphedCall._flatten((x, sigma, cond))
    assert structure == (None, None, SVDCondition) and len(tensors) == 2 + len(cond.astuple())
    assert tensors[2] is cond.astuple()[0]  # the caller's tensors, not copies
    x2, sigma2, cond2 = GraphedCall._rebuild(structure, tensors)
    assert x2 is x and sigma2 is sigma and all(a is b for a, b in zip(cond2.astuple(), cond.astuple()))


def test_channels_last_weights_keep_the_losses_and_are_undone(tmp_path):
    method, models = _beside_plain(tmp_path, Speedups(channels_last=True), rel=1e-4)
    conv = models.teacher.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert method.student.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    accelerate(method, models, Speedups())  # another configuration on the same networks: contiguous again
    assert conv.is_contiguous()


def test_exact_rewrite_computes_the_unets_function_and_its_gradients_and_is_undone():
    """Single-key attention as its projected value: same output and same parameter gradients (fp32, on non-zero
    weights), except the query/key projections of the one-key attention (and the norm feeding only them), whose
    gradient is zero in the original and absent after; restoring brings the original processors back."""
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from prodistill.accel.rewrites import SingleKeyAttnProcessor, apply_rewrites
    from prodistill.models.presets import TINY

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**TINY.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)  # the zero-initialised output layers would hide any difference
    args = (torch.randn(2, 4, 8, 8, 8), torch.tensor([0.5, 1.0]), torch.randn(2, 1, 32), torch.randn(2, 3))

    def run():
        unet.zero_grad(set_to_none=True)
        out = unet(*args, return_dict=False)[0]
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}

    want, want_grads = run()
    # tiny preset: 4 transformer models × (spatial + temporal block) × (self + cross): all get the processor,
    # which passes self-attention through
    assert apply_rewrites([unet]) == {"attention": 16, "temporal_gemm": 0}
    assert isinstance(unet.mid_block.attentions[0].transformer_blocks[0].attn2.processor, SingleKeyAttnProcessor)
    got, grads = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    skipped = set(want_grads) - set(grads)
    assert skipped and all(".attn2.to_q." in n or ".attn2.to_k." in n or ".norm2." in n for n in skipped)
    assert max(want_grads[n].abs().max().item() for n in skipped) < 1e-6  # zero up to rounding in the original
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-5 * scale)
    assert apply_rewrites([unet], on=False) == {"attention": 16, "temporal_gemm": 0}
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_temporal_conv_as_one_gemm_is_the_conv3d_with_its_gradients():
    """TemporalGemmConv3d computes nn.Conv3d (3, 1, 1)'s output and its input, weight and bias gradients (float64);
    in the tiny UNet every temporal conv is swapped (class only: same parameters and state dict), the forward and
    its gradients are unchanged, and the swap is undone when not asked for."""
    from diffusers import UNetSpatioTemporalConditionModel

    from prodistill.accel.rewrites import TemporalGemmConv3d, apply_rewrites
    from prodistill.models.presets import TINY

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0)).double()
    x = torch.randn(2, 6, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    want = conv(x)
    want_grads = torch.autograd.grad(want.square().sum(), (x, conv.weight, conv.bias))
    conv.__class__ = TemporalGemmConv3d
    got = conv(x)
    got_grads = torch.autograd.grad(got.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)

    unet = UNetSpatioTemporalConditionModel(**TINY.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    params, keys = list(unet.parameters()), list(unet.state_dict())
    temporal = sum(isinstance(m, torch.nn.Conv3d) for m in unet.modules())
    args = (torch.randn(2, 4, 8, 8, 8), torch.tensor([0.5, 1.0]), torch.randn(2, 1, 32), torch.randn(2, 3))

    def run():
        unet.zero_grad(set_to_none=True)
        out = unet(*args, return_dict=False)[0]
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    want, want_grads = run()
    assert temporal > 0 and apply_rewrites([unet], temporal_gemm=True) == {"attention": 16, "temporal_gemm": temporal}
    got, grads = run()
    assert list(unet.parameters()) == params and list(unet.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in want_grads)
    assert len(grads) < len(want_grads)  # the attention rewrite's skipped projections (checked above)
    assert apply_rewrites([unet]) == {"attention": 0, "temporal_gemm": temporal}  # not asked for: undone
    assert not any(type(m) is TemporalGemmConv3d for m in unet.modules())
    apply_rewrites([unet], on=False)
    apply_rewrites([unet], temporal_gemm=True)
    _, with_gemm = run()
    apply_rewrites([unet])
    _, without_gemm = run()
    for g, w in zip(with_gemm, without_gemm):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * scale)


def test_temporal_gemm_form_is_used_only_up_to_its_measured_crossover(monkeypatch):
    """Frames of at most 256 positions take the GEMM form (no conv3d call); larger frames take cuDNN's Conv3d. Both
    equal nn.Conv3d."""
    from prodistill.accel import rewrites

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 3, (3, 1, 1), padding=(1, 0, 0)).double()
    calls = []
    real = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    small, large = torch.randn(1, 4, 3, 16, 16).double(), torch.randn(1, 4, 3, 16, 17).double()
    want = [conv(small), conv(large)]
    calls.clear()
    conv.__class__ = rewrites.TemporalGemmConv3d
    got = [conv(small), conv(large)]
    assert rewrites.TemporalGemmConv3d.max_positions == 256 and calls == [large.shape]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_temporal_gemm_rewrite_keeps_the_step_losses_and_is_a_bench_configuration(tmp_path):
    from prodistill.accel.rewrites import TemporalGemmConv3d
    from prodistill.bench.train import parse_configs

    method, models = _beside_plain(tmp_path, Speedups(rewrites=True, temporal_gemm=True), rel=1e-5)
    assert any(type(m) is TemporalGemmConv3d for m in models.teacher.modules())
    assert any(type(m) is TemporalGemmConv3d for m in method.student.modules())
    assert "temporal convs as GEMMs" in Speedups(rewrites=True, temporal_gemm=True).describe()
    accelerate(method, models, Speedups(rewrites=True))  # another configuration on the same networks: undone
    assert not any(type(m) is TemporalGemmConv3d for m in models.teacher.modules())
    assert parse_configs("compile+graphs+conv-gemm", torch.device("cuda"), "osv") == ["compile+graphs+conv-gemm"]


def _rewritten(net) -> bool:
    from prodistill.accel.rewrites import SingleKeyAttnProcessor

    return any(isinstance(p, SingleKeyAttnProcessor) for p in net.attn_processors.values())


def test_exact_rewrite_keeps_the_step_losses_and_is_single_process(tmp_path, monkeypatch):
    method, models = _beside_plain(tmp_path, Speedups(rewrites=True), rel=1e-5)
    assert _rewritten(method.student) and _rewritten(models.teacher)
    accelerate(method, models, Speedups())  # another configuration on the same networks: undone
    assert not _rewritten(models.teacher)
    cpu = torch.device("cpu")
    assert Speedups.from_config(tiny_config(tmp_path), cpu).rewrites
    assert not Speedups.from_config(tiny_config(tmp_path, exact_rewrites="off"), cpu).rewrites
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not Speedups.from_config(tiny_config(tmp_path), cpu).rewrites
    with pytest.raises(SpeedupError, match="--exact-rewrites on needs a single process"):
        Speedups.from_config(tiny_config(tmp_path, exact_rewrites="on"), cpu)
