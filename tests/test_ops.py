"""The fused ops of `ops/`: references, op registrations, the switch (CPU), and the Triton kernels.

CPU: the references against hand-computed values and against the model code they replace, the ops'
written backward formulas against autograd, gradcheck in float64, opcheck, torch.compile(fullgraph=True),
the env-var switch, a light `import ops`, and (where Triton is installed) the Triton kernels themselves
run by Triton's CPU interpreter. GPU (`-m gpu`): the compiled kernels against a float64 reference at the
real shapes, in fp32 and bf16, gradcheck/opcheck on CUDA, NaN-poisoned output buffers, inductor.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.library import opcheck

import ops
from ops import huber, upsampler

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5


def _upsampler_args(n=2, cin=4, h=5, w=6, r=4, c=3, dtype=torch.float64, device="cpu", grad=True, seed=0):
    """Random latents and upsampler parameters (never zeros, gn weights away from 0)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n, cin, h, w), (c * r * r, cin, 3, 3), (c * r * r,), (c,), (c,)]
    scales = [1.0, 0.3, 0.5, 0.5, 0.5]
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) * k for s, k in zip(shapes, scales)]
    tensors[3] = tensors[3] + 1.0  # gn_w
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in tensors]


def _huber_args(shape=(3, 2, 5, 4), dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for _ in range(2)]


def _module_with(args, r):
    from prodistill.models.discriminator import LatentUpsampler

    x, conv_w, conv_b, gn_w, gn_b = args
    module = LatentUpsampler(x.shape[1], gn_w.shape[0], r, eps=EPS).to(x.dtype)
    with torch.no_grad():
        for p, v in zip((module.conv.weight, module.conv.bias, module.norm.weight, module.norm.bias),
                        (conv_w, conv_b, gn_w, gn_b)):
            p.copy_(v)
    return module


# --------------------------------------------------------------------------------------
# pseudo-Huber: reference
# --------------------------------------------------------------------------------------
def test_pseudo_huber_reference_hand_values_from_bf16():
    """bf16 inputs, fp32 math: sample 0 has ‖x−y‖² = 25 and c = 12, so d = √169 − 12 = 1 exactly."""
    x = torch.tensor([[3.0, 4.0], [1.5, -2.0]], dtype=torch.bfloat16)
    y = torch.tensor([[0.0, 0.0], [0.5, -2.0]], dtype=torch.bfloat16)
    d = ops.pseudo_huber(x, y, 12.0)
    assert d.dtype == torch.float32 and d.shape == (2,)
    assert d[0].item() == pytest.approx(1.0, abs=1e-6)
    assert d[1].item() == pytest.approx(math.sqrt(1.0 + 144.0) - 12.0, rel=1e-5)


def test_pseudo_huber_reference_matches_losses_and_is_stable_for_small_distances():
    from prodistill.diffusion.losses import pseudo_huber as losses_pseudo_huber

    x, y = (t.detach().float() for t in _huber_args((4, 3, 8, 8)))
    torch.testing.assert_close(ops.pseudo_huber_reference(x, y, 0.5), losses_pseudo_huber(x, y, 0.5))
    # ‖x − y‖² = 1e-10 ≪ c² = 1: d ≈ s/(2c) = 5e-11; the naive √(s + c²) − c rounds this to 0 in fp32.
    x, y = torch.full((1, 4), 5e-6), torch.zeros(1, 4)
    assert ops.pseudo_huber_reference(x, y, 1.0).item() == pytest.approx(5e-11, rel=1e-5)


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_pseudo_huber_op_backward_formula_matches_autograd(needs):
    x, y = _huber_args()
    x.requires_grad_(needs[0])
    y.requires_grad_(needs[1])
    grad = torch.rand(3, dtype=torch.float64) + 0.5
    wanted = [t for t in (x, y) if t.requires_grad]
    expected = torch.autograd.grad(ops.pseudo_huber_reference(x, y, 0.7), wanted, grad)
    got = torch.autograd.grad(huber.pseudo_huber_op(x, y, 0.7), wanted, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_pseudo_huber_gradcheck_float64():
    x, y = _huber_args()
    assert torch.autograd.gradcheck(lambda a, b: ops.pseudo_huber_reference(a, b, 0.7), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: huber.pseudo_huber_op(a, b, 0.7), (x, y))


def test_pseudo_huber_opcheck_cpu():
    x, y = _huber_args()
    opcheck(torch.ops.prodistill.pseudo_huber.default, (x, y, 0.7))
    d = ops.pseudo_huber_reference(x, y, 0.7).detach()
    g = torch.rand(3, dtype=torch.float64)
    for wrt_x in (True, False):
        opcheck(torch.ops.prodistill.pseudo_huber_grad.default, (x.detach(), y.detach(), d, g, 0.7, wrt_x))


def test_pseudo_huber_rejects_bad_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        ops.pseudo_huber(x, torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="c > 0"):
        ops.pseudo_huber(x, x, 0.0)


# --------------------------------------------------------------------------------------
# latent upsampler: reference
# --------------------------------------------------------------------------------------
def test_upsampler_reference_is_the_module():
    args = _upsampler_args(dtype=torch.float32, grad=False)
    module = _module_with(args, r=4)
    out = ops.latent_upsampler_reference(*args, 4, EPS)
    assert out.shape == (2, 3, 20, 24)
    assert torch.equal(out, module(args[0]))
    per_image = out.double().sub(args[4].view(1, 3, 1, 1)).div(args[3].view(1, 3, 1, 1))
    assert per_image.mean((1, 2, 3)).abs().max().item() < 1e-5  # the norm really is per image, over all channels
    assert per_image.var((1, 2, 3), unbiased=False).sub(1).abs().max().item() < 1e-3


@pytest.mark.parametrize("r,h,w", [(4, 5, 6), (2, 3, 7), (3, 4, 4)])
def test_upsampler_op_matches_module_forward_and_backward(r, h, w):
    """The op's CPU kernels (native group norm + the written backward formulas) against autograd of the module."""
    args = _upsampler_args(h=h, w=w, r=r)
    module = _module_with(args, r)
    grad = torch.randn(2, 3, h * r, w * r, dtype=torch.float64)
    expected = module(args[0])
    expected_grads = torch.autograd.grad(expected, [args[0], *module.parameters()], grad)
    out, mean, rstd = upsampler.latent_upsampler_op(*args, r, EPS)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert mean.dtype == rstd.dtype == torch.float64 and mean.shape == (2,)
    got_grads = torch.autograd.grad(out, args, grad)
    for name, g, e in zip(("x", "conv_w", "conv_b", "gn_w", "gn_b"), got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def test_upsampler_gradcheck_float64():
    args = _upsampler_args(n=2, h=2, w=3, r=2)
    assert torch.autograd.gradcheck(lambda *a: ops.latent_upsampler_reference(*a, 2, EPS), args)
    assert torch.autograd.gradcheck(lambda *a: upsampler.latent_upsampler_op(*a, 2, EPS)[0], args, fast_mode=True)


def test_upsampler_opcheck_cpu():
    args = _upsampler_args(h=3, w=4)
    opcheck(torch.ops.prodistill.latent_upsampler.default, (*args, 4, EPS))
    out, mean, rstd = (t.detach() for t in upsampler.latent_upsampler_op(*args, 4, EPS))
    plain = [t.detach() for t in args]
    opcheck(torch.ops.prodistill.latent_upsampler_backward.default,
            (torch.randn_like(out), plain[0], plain[1], plain[2], plain[3], mean, rstd, 4))


def test_upsampler_rejects_bad_arguments():
    x, conv_w, conv_b, gn_w, gn_b = _upsampler_args(grad=False)
    with pytest.raises(ValueError, match="C·r²"):
        ops.fused_latent_upsampler(x, conv_w, conv_b, gn_w, gn_b, 3, EPS)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.fused_latent_upsampler(x.float(), conv_w, conv_b, gn_w, gn_b, 4, EPS)


# --------------------------------------------------------------------------------------
# torch.compile keeps one graph
# --------------------------------------------------------------------------------------
def test_ops_compile_fullgraph_cpu():
    """Both ops and their backward inside one compiled graph (one frame, no break), equal to eager."""
    torch._dynamo.reset()
    args = _upsampler_args(dtype=torch.float32)
    target = torch.randn(2, 3, 20, 24)

    def loss(*a):
        out = upsampler.latent_upsampler_op(*a, 4, EPS)[0]
        return huber.pseudo_huber_op(out, target, 0.3).mean()

    _assert_one_graph_matching_eager(loss, args, "aot_eager")


def test_public_functions_compile_fullgraph_cpu(monkeypatch):
    """The switch (env var read included) traces without a graph break."""
    torch._dynamo.reset()
    monkeypatch.setenv(ops.ENV_VAR, "1")
    args = _upsampler_args(dtype=torch.float32, grad=False)
    target = torch.randn(2, 3, 20, 24)

    def loss(*a):
        return ops.pseudo_huber(target, ops.fused_latent_upsampler(*a, 4, EPS), 0.3).mean()

    torch.testing.assert_close(torch.compile(loss, backend="aot_eager", fullgraph=True)(*args), loss(*args))


# --------------------------------------------------------------------------------------
# the switch and a light import
# --------------------------------------------------------------------------------------
def test_switch(monkeypatch):
    from ops import _switch

    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(_switch, "_triton_installed", lambda: True)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert not ops.use_fused(on_cuda, None)  # default: the reference, until the kernels are measured on a GPU
    assert ops.use_fused(on_cuda, True)
    assert not ops.use_fused(torch.zeros(1), None)  # CPU tensors: always the reference
    assert not ops.use_fused(torch.zeros(1), True)
    monkeypatch.setenv(ops.ENV_VAR, "0")
    assert not ops.use_fused(on_cuda, None)
    assert ops.use_fused(on_cuda, True)  # the argument wins over the env var
    monkeypatch.setenv(ops.ENV_VAR, "1")
    assert not ops.use_fused(on_cuda, False)
    monkeypatch.setenv(ops.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="PRODISTILL_FUSED_OPS must be 0"):
        ops.use_fused(on_cuda, None)
    monkeypatch.setattr(_switch, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install '\.\[ops\]'"):
        ops.use_fused(on_cuda, True)


def test_public_functions_route_through_the_switch(monkeypatch):
    """With the switch on, the public functions call the registered ops; off, the plain references."""
    calls = []
    monkeypatch.setattr(huber, "use_fused", lambda t, fused: fused)
    monkeypatch.setattr(upsampler, "use_fused", lambda t, fused: fused)
    monkeypatch.setattr(huber, "pseudo_huber_op", lambda *a: calls.append("huber") or huber.pseudo_huber_reference(*a))
    monkeypatch.setattr(upsampler, "latent_upsampler_op",
                        lambda *a: calls.append("upsampler") or (upsampler.latent_upsampler_reference(*a),))
    x, y = _huber_args()
    args = _upsampler_args()
    for fused in (False, True):
        torch.testing.assert_close(ops.pseudo_huber(x, y, 0.5, fused=fused), ops.pseudo_huber_reference(x, y, 0.5))
        torch.testing.assert_close(ops.fused_latent_upsampler(*args, 4, EPS, fused=fused),
                                   ops.latent_upsampler_reference(*args, 4, EPS))
    assert calls == ["huber", "upsampler"]


def test_import_is_light():
    code = ("import sys, ops; bad = [m for m in ('triton', 'ops._huber_triton', 'ops._upsampler_triton') "
            "if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# --------------------------------------------------------------------------------------
# the Triton kernels on CPU, through Triton's interpreter
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install '.[ops]')")
def test_triton_kernels_in_interpreter():
    """The kernels' index math and formulas, run by TRITON_INTERPRET=1 on CPU tensors (about 15 s).

    Odd sizes on purpose: h not a multiple of the row block, w not a power of two, r = 2 padded to the
    matrix products' minimum of 16. The compiled GPU kernels are covered by the `gpu` tests below.
    """
    script = textwrap.dedent("""
        import torch
        from ops import _huber_triton, _upsampler_triton
        from ops.huber import pseudo_huber_reference
        from ops.upsampler import latent_upsampler_reference
        torch.manual_seed(0)
        x, y = torch.randn(2, 3, 700), torch.randn(2, 3, 700)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        g = torch.rand(2) + 0.5
        ref = pseudo_huber_reference(xr, yr, 0.3)
        d = _huber_triton.forward(x, y, 0.3)
        torch.testing.assert_close(d, ref.detach(), rtol=1e-6, atol=0)
        for got, exp in zip((_huber_triton.grad(x, y, d, g, 0.3, True), _huber_triton.grad(x, y, d, g, 0.3, False)),
                            torch.autograd.grad(ref, (xr, yr), g)):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
        n, cin, h, w, r = 1, 4, 3, 5, 2
        args = [torch.randn(n, cin, h, w), torch.randn(3 * r * r, cin, 3, 3) * 0.3, torch.randn(3 * r * r),
                torch.rand(3) + 0.5, torch.randn(3)]
        out, mean, rstd = _upsampler_triton.forward(*args, r, 1e-5)
        leaves = [a.clone().requires_grad_() for a in args]
        ref = latent_upsampler_reference(*leaves, r, 1e-5)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        got = _upsampler_triton.backward(grad, *args[:4], mean, rstd, r)
        for name, a, b in zip(("x", "conv_w", "conv_b", "gn_w", "gn_b"), got, torch.autograd.grad(ref, leaves, grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        print("interpreter ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "interpreter ok" in done.stdout, done.stderr[-4000:]


def test_bench_runs_on_cpu(tmp_path):
    """`python3 -m ops.bench` on CPU: tiny shapes, eager and compiled reference, a table and a JSON report."""
    from ops import bench

    path = tmp_path / "ops.json"
    assert bench.main(["--device", "cpu", "--compile-backend", "aot_eager", "--reps", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert {(r["op"], r["variant"]) for r in rows} == {(op, v) for op in ("upsampler", "pseudo_huber")
                                                        for v in ("eager", "compiled")}
    assert all(r["error"] is None and r["ms"] > 0 and r["rel_err"] < 1e-5 for r in rows)


# --------------------------------------------------------------------------------------
# GPU: the compiled Triton kernels
# --------------------------------------------------------------------------------------
def _max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref|: catches a single wrong element that a norm ratio would average away."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# Per-dtype tolerance on _max_err against a float64 reference from the same (rounded) inputs: the kernels
# compute in fp32, so fp32 results are off by accumulated rounding only, bf16 ones by the final rounding
# of each value to bf16 (2^-8 relative at most).
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
HUBER_SHAPES = [(1, 14, 4, 64, 64), (1, 14, 4, 128, 72), (3, 5, 7)]
# Real shapes (→ 256², → 224²) in both dtypes; odd sizes and r = 2 in fp32 only. Every new (dtype, r, width)
# costs Triton a build of the five upsampler kernels, so the other GPU tests reuse these geometries.
UPSAMPLER_CASES = [((14, 4, 64, 64), 4), ((14, 4, 56, 56), 4), ((3, 4, 13, 20), 4), ((2, 4, 9, 11), 2)]
UPSAMPLER_PARITY = [(case, dtype) for case in UPSAMPLER_CASES for dtype in (torch.float32, torch.bfloat16)
                    if dtype == torch.float32 or case[0][-1] >= 56]


def _huber_c(shape) -> float:
    return 0.00054 * math.sqrt(math.prod(shape[1:]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", HUBER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pseudo_huber_fused_matches_reference_cuda(shape, dtype):
    x, y = _huber_args(shape, dtype, "cuda")
    c = _huber_c(shape)
    grad = torch.rand(shape[0], device="cuda") + 0.5
    d = ops.pseudo_huber(x, y, c, fused=True)
    got = torch.autograd.grad(d, (x, y), grad)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    d64 = ops.pseudo_huber_reference(x64, y64, c)
    expected = torch.autograd.grad(d64, (x64, y64), grad.double())
    assert "ops._huber_triton" in sys.modules  # the fused path really ran
    assert d.dtype == torch.float32 and d.shape == (shape[0],)
    assert _max_err(d, d64) < 1e-5, "forward: partial sums in fp32, one per 2048 elements"
    for name, g, e in zip(("dx", "dy"), got, expected):
        assert g.dtype == dtype
        assert _max_err(g, e) < TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", UPSAMPLER_PARITY,
                         ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else f"{v[0]}r{v[1]}")
def test_upsampler_fused_matches_reference_cuda(case, dtype):
    """Forward and all five gradients against float64; in bf16 also no worse than the eager bf16 modules."""
    (n, cin, h, w), r = case
    args = _upsampler_args(n, cin, h, w, r, dtype=dtype, device="cuda")
    grad = torch.randn(n, 3, h * r, w * r, device="cuda", dtype=dtype)
    out = ops.fused_latent_upsampler(*args, r, EPS, fused=True)
    got = (out, *torch.autograd.grad(out, args, grad))
    assert "ops._upsampler_triton" in sys.modules
    args64 = [a.detach().double().requires_grad_() for a in args]
    out64 = ops.latent_upsampler_reference(*args64, r, EPS)
    expected = (out64, *torch.autograd.grad(out64, args64, grad.double()))
    out_eager = ops.latent_upsampler_reference(*args, r, EPS)
    eager = (out_eager, *torch.autograd.grad(out_eager, args, grad))
    names = ("out", "dx", "d_conv_w", "d_conv_b", "d_gn_w", "d_gn_b")
    for name, g, e, ref_eager in zip(names, got, expected, eager):
        assert g.dtype == dtype and g.shape == e.shape, name
        err = _max_err(g, e)
        assert err < TOL[dtype], f"{name}: {err:.2e}"
        if dtype == torch.bfloat16:
            assert err <= 2 * _max_err(ref_eager, e) + 4e-3, f"{name}: fused {err:.2e} vs eager bf16"  # 4e-3 ≈ 2^-8


@pytest.mark.gpu
def test_fused_gradcheck_cuda():
    """gradcheck of the Triton kernels in fp32 (they compute in fp32; fp64 takes the reference), hence the
    larger step and tolerances than the CPU float64 gradchecks."""
    tol = dict(eps=5e-3, atol=2e-2, rtol=2e-2, fast_mode=True)
    args = _upsampler_args(1, 4, 3, 20, 4, dtype=torch.float32, device="cuda")
    assert torch.autograd.gradcheck(lambda *a: upsampler.latent_upsampler_op(*a, 4, EPS)[0], args, **tol)
    x, y = _huber_args((2, 3, 5), torch.float32, "cuda")
    assert torch.autograd.gradcheck(lambda a, b: huber.pseudo_huber_op(a, b, 0.5), (x, y), **tol)


@pytest.mark.gpu
def test_fused_opcheck_cuda():
    args = _upsampler_args(2, 4, 3, 20, 4, dtype=torch.float32, device="cuda")
    opcheck(torch.ops.prodistill.latent_upsampler.default, (*args, 4, EPS))
    out, mean, rstd = (t.detach() for t in upsampler.latent_upsampler_op(*args, 4, EPS))
    plain = [t.detach() for t in args]
    opcheck(torch.ops.prodistill.latent_upsampler_backward.default,
            (torch.randn_like(out), *plain[:4], mean, rstd, 4))
    x, y = _huber_args((3, 4, 50), torch.bfloat16, "cuda")
    opcheck(torch.ops.prodistill.pseudo_huber.default, (x, y, 0.5))
    d = huber.pseudo_huber_op(x, y, 0.5).detach()
    for wrt_x in (True, False):
        opcheck(torch.ops.prodistill.pseudo_huber_grad.default,
                (x.detach(), y.detach(), d, torch.rand(3, device="cuda"), 0.5, wrt_x))


@pytest.mark.gpu
def test_fused_kernels_write_every_output(monkeypatch):
    """Every buffer the kernels write starts as NaN: any element they skip would show up."""
    from ops import _triton_common

    monkeypatch.setattr(_triton_common, "empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    for shape, r in UPSAMPLER_CASES[1:]:
        args = _upsampler_args(*shape, r, dtype=torch.float32, device="cuda")
        out = ops.fused_latent_upsampler(*args, r, EPS, fused=True)
        grads = torch.autograd.grad(out, args, torch.randn_like(out))
        ref = ops.latent_upsampler_reference(*args, r, EPS)
        assert all(torch.isfinite(t).all() for t in (out, *grads)), shape
        assert _max_err(out, ref) < TOL[torch.float32]
    for shape in HUBER_SHAPES[1:]:
        x, y = _huber_args(shape, torch.bfloat16, "cuda")
        d = ops.pseudo_huber(x, y, 0.5, fused=True)
        grads = torch.autograd.grad(d, (x, y), torch.rand_like(d))
        assert all(torch.isfinite(t).all() for t in (d, *grads)), shape
        assert _max_err(d, ops.pseudo_huber_reference(x, y, 0.5)) < 1e-5


@pytest.mark.gpu
def test_fused_ops_compile_inductor_cuda():
    """Inductor keeps both fused ops in one graph (one frame) and gives what eager gives."""
    torch._dynamo.reset()
    args = _upsampler_args(2, 4, 6, 56, 4, dtype=torch.bfloat16, device="cuda")
    target = torch.randn(2, 3, 24, 224, device="cuda", dtype=torch.bfloat16)

    def loss(*a):
        out = ops.fused_latent_upsampler(*a, 4, EPS, fused=True)
        return ops.pseudo_huber(target, out, 0.3, fused=True).mean()

    _assert_one_graph_matching_eager(loss, args, "inductor")


def _assert_one_graph_matching_eager(loss, args, backend: str) -> None:
    """`loss` compiles to one graph (fullgraph) whose value and gradients equal the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    got = torch.compile(loss, backend=counter, fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, args)
    expected = loss(*args)
    expected_grads = torch.autograd.grad(expected, args)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
