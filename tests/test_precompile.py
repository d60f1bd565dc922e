"""Ahead-of-time compiled regions (`prodistill.accel.precompile`) on CPU with the aot_eager backend: the same
code path as inductor on a GPU (dynamo's AOT entry point, serialised guards, files in the compile cache), with
eager kernels, so results must match the eager step."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_trainer, tiny_config
from prodistill.accel import Speedups, accelerate
from prodistill.accel import precompile
from prodistill.accel.compile import REGION_MODULES
from prodistill.training.logger import read_metrics

pytestmark = pytest.mark.skipif(not precompile.supported("aot_eager"),
                                reason="this torch has no dynamo AOT compile entry point")


def _compiler(module) -> precompile.Precompiler:
    calls = [m.forward for m in module.modules() if isinstance(vars(m).get("forward"), precompile.RegionCall)]
    assert calls
    return calls[0].compiler


def _losses(run_dir):
    return [(r["step"], r["loss/g_total"], r["loss/d"]) for r in read_metrics(run_dir)]


def test_precompiled_teacher_matches_eager_and_a_second_launch_only_loads(tmp_path):
    """First launch: every teacher region variant met in step 1 is compiled once (queued, then compiled when
    the teacher's UNet is called again) and written to the cache; the losses equal the eager run's. A second
    launch on the same cache compiles nothing and loads every file."""
    cfg = tiny_config(tmp_path)
    eager, _, models = make_trainer(cfg, tmp_path / "eager", stage=2)
    eager.fit()
    speedups = Speedups(compile="teacher", backend="aot_eager", compile_workers=1, cache_dir=tmp_path / "cache")
    first, method, _ = make_trainer(cfg, tmp_path / "first", stage=2, models=models)
    accelerate(method, models, speedups)
    first.fit()
    stats = _compiler(models.teacher).stats
    files = sorted((tmp_path / "cache" / "aot").glob("*.aot"))
    assert stats["compiled"] == len(files) > 4 and stats["failed"] == 0
    assert sorted(v["file"] for v in stats["variants"]) == [f.name for f in files]  # each one's compile time kept
    assert {f.name.split("-")[0] for f in files} == {"SpatioTemporalResBlock", "TransformerSpatioTemporalModel",
                                                       "Downsample2D", "Upsample2D"}
    for module in models.teacher.modules():  # what a new process would have: plain modules, a fresh Precompiler
        vars(module).pop("forward", None)
    precompile._SHARED.clear()
    second, method, _ = make_trainer(cfg, tmp_path / "second", stage=2, models=models)
    accelerate(method, models, speedups)
    second.fit()
    stats = _compiler(models.teacher).stats
    assert stats["compiled"] == 0 and stats["loaded"] == len(files)
    want = _losses(tmp_path / "eager")
    for run in ("first", "second"):
        got = _losses(tmp_path / run)
        assert [s for s, *_ in got] == [s for s, *_ in want]
        torch.testing.assert_close(torch.tensor([g[1:] for g in got]), torch.tensor([w[1:] for w in want]),
                                   rtol=1e-5, atol=1e-6)


def test_every_network_precompiled_trains_as_eager_with_checkpointed_waiting_blocks(tmp_path, monkeypatch):
    """OSV stage 2 with every network's regions compiled ahead of time in this process: the student's UNet blocks
    run eagerly and activation-checkpointed in the first step (their variants wait in the queue; the backward
    recomputes them) and compiled in the next; the losses follow the eager run's."""
    cfg = tiny_config(tmp_path, max_steps=2)
    eager, _, models = make_trainer(cfg, tmp_path / "eager", stage=2)
    eager.fit()
    checkpointed = []
    original = precompile.checkpoint

    def counted(fn, module, *args, **kwargs):
        checkpointed.append(type(module).__name__)
        return original(fn, module, *args, **kwargs)

    monkeypatch.setattr(precompile, "checkpoint", counted)
    fast, method, _ = make_trainer(cfg, tmp_path / "fast", stage=2, models=models)
    accelerate(method, models, Speedups(compile="all", backend="aot_eager", compile_workers=1,
                                        cache_dir=tmp_path / "cache"))
    fast.fit()
    assert {"SpatioTemporalResBlock", "TransformerSpatioTemporalModel"} <= set(checkpointed)
    stats = _compiler(method.student).stats
    assert stats["compiled"] > 10 and stats["failed"] == 0
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "fast")
    assert [s for s, *_ in got] == [s for s, *_ in want] == [1, 2]
    torch.testing.assert_close(torch.tensor([g[1:] for g in got]), torch.tensor([w[1:] for w in want]),
                               rtol=1e-5, atol=1e-6)


def _res_block():
    from diffusers import UNetSpatioTemporalConditionModel

    from prodistill.models.presets import TINY

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**TINY.unet)
    block = unet.down_blocks[0].resnets[0]
    x = torch.randn(4, block.spatial_res_block.conv1.in_channels, 8, 8)
    temb = torch.randn(4, unet.time_embedding.linear_2.out_features)
    return unet, block, (x, temb, torch.zeros(1, 4))


def test_variants_compile_in_background_worker_processes(tmp_path, caplog):
    """Two variants (with and without grad) met under bf16 autocast are handed at once to two spawned processes
    compiling from weightless copies; meanwhile their calls run eagerly; once compiled the loaded code passes
    its checks and gives eager's outputs and gradients (bf16 rounding apart), and the pool is stopped. Each
    variant's compile time and when it was ready are kept, and the batch's log line names the slowest. The pool
    is started and warmed up first, as a first launch does."""
    _, block, args = _res_block()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        want = block(*args)
    x = args[0].clone().requires_grad_(True)
    with autocast:
        block(x, *args[1:]).float().square().sum().backward()
    want_grad = x.grad.clone()
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=2)
    compiler.prewarm("cpu", REGION_MODULES)  # the workers start (and import) before any variant is met
    compiler.wrap([block])
    with torch.no_grad(), autocast:
        block(*args)  # submitted, eager
    x.grad = None
    with autocast:
        block(x, *args[1:]).float().square().sum().backward()  # submitted, eager
    assert len(compiler.futures) == 2 and not compiler.queue and compiler.pool is not None
    with torch.no_grad(), autocast:  # called again while (most likely) still compiling: eager, same result
        again = block(*args)
    torch.testing.assert_close(again, want)
    with caplog.at_level("INFO", logger=precompile.log.name):
        compiler.flush()  # what the CUDA-graph capture does: wait for the background work
    assert not compiler.pending() and compiler.pool is None
    assert compiler.stats["compiled"] == 2 and len(list((tmp_path / "aot").glob("*.aot"))) == 2
    timed = compiler.stats["variants"]
    assert sorted(v["file"] for v in timed) == sorted(p.name for p in (tmp_path / "aot").glob("*.aot"))
    assert all(0 < v["compile_s"] <= v["ready_after_s"] for v in timed)  # a worker's own time is within the batch's
    assert "slowest: SpatioTemporalResBlock" in caplog.text
    assert not list((tmp_path / "aot").glob("*.job"))
    with torch.no_grad(), autocast:
        got = block(*args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    x.grad = None
    with autocast:
        block(x, *args[1:]).float().square().sum().backward()
    torch.testing.assert_close(x.grad, want_grad, rtol=2e-2, atol=2e-2)
    assert compiler.stats["loaded"] == 2 and not compiler.failed


def _saved_bytes(fn) -> tuple[int, object]:
    """The bytes autograd stores for the backward while `fn()` runs (tensors handed to saved-tensor hooks; a
    checkpointed call hands over none of its intermediates), and `fn()`'s result."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


def test_waiting_unet_blocks_are_checkpointed(tmp_path, monkeypatch):
    """While its variant waits to be compiled, a res-block's differentiated eager call stores none of its
    intermediates for the backward (recomputed there) and gives the same output and gradients, bit for bit; with
    `checkpoint_waiting` off (`--grad-checkpointing`) it stores what plain eager stores."""
    _, block, args = _res_block()
    params = list(block.parameters())

    def step(x):
        out = block(x, *args[1:])
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
        return out, grads

    x = args[0].clone().requires_grad_()
    plain_bytes, (want, want_grads) = _saved_bytes(lambda: step(x))
    for on, folder in ((True, "on"), (False, "off")):
        compiler = precompile.Precompiler(tmp_path / folder, "aot_eager", workers=1)
        compiler.checkpoint_waiting = on
        vars(block).pop("forward", None)
        compiler.wrap([block])
        nbytes, (got, got_grads) = _saved_bytes(lambda: step(x))
        assert compiler.queue and compiler.stats["compiled"] == 0  # the call ran eagerly, its variant queued
        assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
        if on:
            assert plain_bytes > 100_000 and nbytes < plain_bytes / 5  # left: the block's inputs, the loss's save
        else:
            assert nbytes == plain_bytes
    checkpointed = []
    monkeypatch.setattr(precompile, "checkpoint", lambda *a, **k: checkpointed.append(a[1]))
    vars(block)["forward"].compiler.checkpoint_waiting = True
    with torch.no_grad():  # a new variant (no grad), eager while it waits, but not differentiated: not checkpointed
        block(*args)
    assert vars(block)["forward"].compiler.queue and checkpointed == []


def test_background_compile_failure_falls_back_to_just_in_time(tmp_path, monkeypatch, caplog):
    """A variant whose background compilation fails is reported once and then runs through torch.compile."""
    _, block, args = _res_block()
    with torch.no_grad():
        want = block(*args)
    compiler = precompile.Precompiler(tmp_path, "no_such_backend", workers=2)
    monkeypatch.setattr(precompile, "_backend", lambda name: name)  # (in this process only: the worker fails)
    compiler.wrap([block])
    with torch.no_grad():
        block(*args)
    assert compiler.pending()
    with caplog.at_level(logging.WARNING, logger="prodistill"):
        compiler.flush()
    assert "failed" in caplog.text and compiler.stats["failed"] == 1 and compiler.stats["compiled"] == 0
    call = vars(block)["forward"]
    call.fallback = torch.compile(type(block).forward.__get__(block), backend="eager")  # a backend that exists
    with torch.no_grad():
        got = block(*args)
    torch.testing.assert_close(got, want)
    assert list(call.variants.values()) == ["jit"]


def test_graphed_solve_runs_eagerly_until_the_compiler_is_ready():
    """With `ready`, the first call of a signature and every call while `ready()` is False run the plain solve
    (no capture, so this runs on the CPU); the capture waits for the background compiler."""
    from dataclasses import dataclass

    from prodistill.accel.graphs import GraphedSolve

    @dataclass
    class Cond:
        c: torch.Tensor

    calls = []

    def solve(x, path, cond, guidance):
        calls.append(x.shape)
        return x + cond.c

    state = {"ready": False}
    graphed = GraphedSolve(solve, ready=lambda: state["ready"])
    x, cond = torch.zeros(2, 3), Cond(torch.ones(2, 3))
    for _ in range(3):
        torch.testing.assert_close(graphed(x, torch.zeros(2), cond, torch.ones(1)), x + 1)
    assert len(calls) == 3 and not graphed.graphs
    state["ready"] = True
    with pytest.raises(Exception):  # ready and seen: it captures, which needs CUDA
        graphed(x, torch.zeros(2), cond, torch.ones(1))
    fresh = GraphedSolve(solve, ready=lambda: True)
    fresh(x, torch.zeros(2), cond, torch.ones(1))  # a new signature's first call is eager even when ready
    assert len(calls) == 4


def test_variant_identity(tmp_path):
    """Blocks of one structure share a variant file, another width does not; grad mode, autocast and input
    shapes are part of the call's signature."""
    unet, block, args = _res_block()


    twin = copy.deepcopy(block)
    torch.nn.init.normal_(twin.spatial_res_block.conv1.weight)  # values are not part of the variant
    other = unet.down_blocks[1].resnets[0]
    key = precompile.call_key(block, args, {})
    assert precompile.structure(twin) == precompile.structure(block) != precompile.structure(other)
    from prodistill.accel.layout import set_conv_layout

    assert set_conv_layout([twin], True) == 2  # the spatial res-block's two Conv2d (the temporal one's are Conv3d)
    assert precompile.structure(twin) != precompile.structure(block)  # channels-last weights compile to other code
    assert set_conv_layout([twin], False) == 2 and precompile.structure(twin) == precompile.structure(block)
    with torch.no_grad():
        assert precompile.call_key(block, args, {}) != key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precompile.call_key(block, args, {}) != key
    assert precompile.call_key(block, (args[0][:2], args[1][:2], args[2][:, :2]), {}) != key


def test_an_unloadable_file_falls_back_to_just_in_time_compile(tmp_path, caplog):
    """A corrupt variant file is reported once and that variant runs through torch.compile instead."""
    _, block, args = _res_block()
    with torch.no_grad():
        want = block(*args)
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=1)
    compiler.wrap([block])
    with torch.no_grad():
        block(*args)
        block(*args)  # compiles and loads
        (path,) = list((tmp_path / "aot").glob("*.aot"))
    path.write_bytes(b"not a compiled function")
    fresh = precompile.Precompiler(tmp_path, "aot_eager", workers=1)
    vars(block).pop("forward")
    fresh.wrap([block])
    with caplog.at_level(logging.WARNING, logger="prodistill"), torch.no_grad():
        got = block(*args)
    assert "compiling it just in time" in caplog.text and str(path) in fresh.failed
    torch.testing.assert_close(got, want)


class Scaled(torch.nn.Linear):
    """A Linear of another class (at module level: dynamo saves classes by their import path)."""

    def forward(self, x):
        return super().forward(x) * 2


def test_swapped_layers_are_a_new_variant_once_forgotten(tmp_path):
    """A region whose layers are swapped after it ran compiled (what FP8 conversion does to the teacher shared by
    `bench train` configurations) fails dynamo's guards with its cached function; `forget_variants` (called by
    `accelerate` after the FP8 step) makes it resolve a new variant, which gives the new layers' result."""
    _, block, args = _res_block()
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=1)
    compiler.wrap([block])
    with torch.no_grad():
        block(*args)
        block(*args)  # compiled and loaded
    old = block.spatial_res_block.time_emb_proj
    new = Scaled(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    block.spatial_res_block.time_emb_proj = new
    with torch.no_grad():
        want = type(block).forward(block, *args)
        with pytest.raises(RuntimeError, match="[Gg]uard"):
            block(*args)
        precompile.forget_variants(block)
        block(*args)
        got = block(*args)  # the new variant, compiled and loaded
    torch.testing.assert_close(got, want)
    assert compiler.stats["compiled"] == 2 and not compiler.failed


def test_inductor_options_reach_the_compilers_and_the_variant_identity(tmp_path, monkeypatch):
    """$PRODISTILL_INDUCTOR_OPTIONS: parsed and checked against inductor's config (a bad value is one sentence
    before any model is built), handed to the worker's inductor backend, and part of a variant's file name."""
    from prodistill.accel import SpeedupError
    from prodistill.accel.compile import inductor_options

    _, block, args = _res_block()
    key = precompile.call_key(block, args, {})
    plain = precompile._fingerprint(block, key, "inductor")
    assert inductor_options() == {}
    monkeypatch.setenv("PRODISTILL_INDUCTOR_OPTIONS", '{"max_autotune": true}')
    assert inductor_options() == {"max_autotune": True}
    assert precompile._fingerprint(block, key, "inductor") != plain
    assert precompile._fingerprint(block, key, "aot_eager") == precompile._fingerprint(block, key, "aot_eager")
    assert precompile._backend("inductor", inductor_options()).config["max_autotune"] is True
    for text, message in (("max_autotune", "is not JSON"), ('["x"]', "must be a JSON object"),
                          ('{"no_such_option": 1}', "no_such_option is no option")):
        monkeypatch.setenv("PRODISTILL_INDUCTOR_OPTIONS", text)
        with pytest.raises(SpeedupError, match=message):
            Speedups.from_config(tiny_config(tmp_path, compile="on"), torch.device("cpu"))


class _FakePool:
    """A ProcessPoolExecutor that records what it is handed and finishes each call when the test says so."""

    def __init__(self, *args, **kwargs):
        self.handed: list[tuple] = []
        self.futures: list = []

    def submit(self, fn, *args):
        from concurrent.futures import Future

        self.handed.append((fn.__name__, *args))
        self.futures.append(Future())
        return self.futures[-1]

    def shutdown(self, **kwargs):
        pass


def _job(tmp_path, name: str, layers: int, grad: bool) -> tuple[str, precompile.Job]:
    module = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(layers)))
    job = precompile.Job(str(tmp_path / f"{name}.aot"), precompile._skeleton(module), (torch.zeros(1, 2),), {},
                         grad, ("cpu", torch.bfloat16, False), "cpu", "aot_eager", precompile._global_flags(), {})
    return job.path, job


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_background_variants_are_handed_out_longest_first(tmp_path, monkeypatch):
    """Variants wait in the parent until a worker is free, and go out differentiated first, then the larger
    (more parameter tensors) first — not in the order the step met them — so that a cold launch does not end
    waiting on a long compilation started last. Each variant's record says when it was queued and ready."""
    monkeypatch.setattr(precompile, "ProcessPoolExecutor", _FakePool)
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=2)
    jobs = [_job(tmp_path, "small-nograd", 1, False), _job(tmp_path, "big-nograd", 4, False),
            _job(tmp_path, "small-grad", 1, True), _job(tmp_path, "big-grad", 3, True)]
    assert sorted(precompile.expected_cost(j) for _, j in jobs) == [
        precompile.expected_cost(jobs[i][1]) for i in (3, 2, 1, 0)]
    with compiler._cv:  # all four met before the feeder looks (as in a step's first calls)
        for path, job in jobs:
            compiler._submit(path, job)
    pool = compiler.pool

    def handed():
        return [args[1].split("/")[-1].split(".aot")[0] for args in pool.handed]

    _wait_for(lambda: len(pool.handed) == 2)
    assert handed() == ["big-grad", "small-grad"] and compiler.pending()  # two workers: two under way
    pool.futures[1].set_result(1.5)
    _wait_for(lambda: len(pool.handed) == 3)
    assert handed()[2] == "big-nograd"
    pool.futures[0].set_result(2.0)
    _wait_for(lambda: len(pool.handed) == 4)
    pool.futures[2].set_result(0.5)
    pool.futures[3].set_exception(RuntimeError("boom"))
    compiler.flush()
    assert compiler.pool is None and not compiler.futures
    assert compiler.stats["compiled"] == 3 and compiler.stats["failed"] == 1
    timed = {v["file"]: v for v in compiler.stats["variants"]}
    assert set(timed) == {"big-grad.aot", "small-grad.aot", "big-nograd.aot"}
    assert all(0 <= v["queued_after_s"] <= v["ready_after_s"] for v in timed.values())
    assert timed["small-grad.aot"]["compile_s"] == 1.5


def test_a_first_launch_starts_the_compile_processes_before_the_models(tmp_path, monkeypatch, caplog):
    """`start_compile_workers`: on an empty cache, the pool starts at once and each worker is given the warm-up
    (imports, one tiny compile; a failed one is a warning); not with one worker, compiling off or a cache holding
    variant files. A prewarmed pool that gets no variant is stopped when the steps ask whether anything is
    pending; variants met while the processes warm up wait, and the longest goes out first when one is free."""
    from prodistill.accel import start_compile_workers

    monkeypatch.setattr(precompile, "ProcessPoolExecutor", _FakePool)
    monkeypatch.setattr(precompile, "_SHARED", {})
    cpu = torch.device("cpu")
    speedups = Speedups(compile="all", backend="aot_eager", compile_workers=3, cache_dir=tmp_path / "cold")
    assert start_compile_workers(speedups, cpu)
    compiler = precompile.Precompiler.shared(tmp_path / "cold", "aot_eager", 3)
    assert [h[0] for h in compiler.pool.handed] == ["_warm_up"] * 3
    assert compiler.pool.handed[0][1:] == ("cpu", REGION_MODULES, "aot_eager", {})
    assert not compiler.pending() and compiler.pool is None  # nothing came: stopped
    assert start_compile_workers(speedups, cpu)  # still cold: started again
    pool = compiler.pool
    for path, job in (_job(tmp_path, "small", 1, True), _job(tmp_path, "big", 3, True)):
        compiler._submit(path, job)  # met while every process still warms up: both wait
    with caplog.at_level(logging.WARNING, logger="prodistill"):
        pool.futures[0].set_exception(RuntimeError("no GPU"))  # a failed warm-up is said, not fatal; a slot frees
    assert "warming up a background compile process failed (RuntimeError: no GPU)" in caplog.text
    _wait_for(lambda: len(pool.handed) == 4)
    assert pool.handed[3][1].endswith("big.aot.%d.job" % os.getpid())  # the longer one first
    pool.futures[1].set_result(1.0)
    _wait_for(lambda: len(pool.handed) == 5)
    compiler.close()
    (tmp_path / "warm" / "aot").mkdir(parents=True)
    (tmp_path / "warm" / "aot" / "SpatioTemporalResBlock-0.aot").write_bytes(b"")
    for other in (replace(speedups, compile_workers=1), replace(speedups, compile="off"),
                  replace(speedups, cache_dir=tmp_path / "warm")):
        assert not start_compile_workers(other, cpu)
    assert precompile.Precompiler.shared(tmp_path / "warm", "aot_eager", 3).pool is None


def test_the_warm_up_imports_every_region_class(monkeypatch):
    """What a worker imports as it starts defines every region class (REGION_MODULES kept in step with
    REGION_CLASSES); a module that is not installed is skipped; it compiles one tiny differentiated region."""
    import importlib

    from prodistill.accel.compile import REGION_CLASSES

    assert precompile._warm_up("cpu", (), "aot_eager", {}) > 0  # the real compile goes through
    compiled = []
    monkeypatch.setattr(precompile, "compile_job", lambda job: compiled.append(job) or 0.0)
    assert precompile._warm_up("cpu", (*REGION_MODULES, "no_such_module_for_prodistill"), "aot_eager", {}) >= 0
    assert [(job.grad, job.backend, job.device, Path(job.path).name) for job in compiled] == [
        (True, "aot_eager", "cpu", "warm-up.aot")]
    assert not Path(compiled[0].path).parent.exists()  # compiled into a folder that is gone
    modules = [importlib.import_module(name) for name in REGION_MODULES]
    assert all(any(hasattr(m, cls) for m in modules) for cls in REGION_CLASSES)


def test_a_broken_pool_fails_every_held_variant(tmp_path, monkeypatch):
    """When the pool cannot take work any more (a process died), the variant being handed out and every one still
    held fail — each then compiles just in time — rather than waiting for ever."""
    from concurrent.futures.process import BrokenProcessPool

    class Broken(_FakePool):
        def submit(self, fn, *args):
            if len(self.handed) == 1:
                raise BrokenProcessPool("a child process terminated abruptly")
            return super().submit(fn, *args)

    monkeypatch.setattr(precompile, "ProcessPoolExecutor", Broken)
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=2)
    with compiler._cv:
        for path, job in (_job(tmp_path, "a", 3, True), _job(tmp_path, "b", 2, True), _job(tmp_path, "c", 1, True)):
            compiler._submit(path, job)
    _wait_for(lambda: sum(f.done() for f in compiler.futures.values()) == 2)
    compiler.pool.futures[0].set_result(1.0)
    compiler.flush()
    assert compiler.stats["compiled"] == 1 and compiler.stats["failed"] == 2 and not compiler.pending()
    assert {Path(p).name for p in compiler.failed} == {"b.aot", "c.aot"}


def test_variants_met_after_the_pool_broke_fail_at_once_and_a_new_pool_follows(tmp_path, monkeypatch):
    """A process that died (here while warming up) or could not start (`submit` raising OSError) leaves a pool that
    takes no work: the variants met after that fail at once too — each compiles just in time — instead of waiting
    for a feeder that is gone (which hung `flush`, `pending` and the graph capture for ever); once nothing is under
    way the pool is replaced, and the next variant goes to a new one."""
    from concurrent.futures.process import BrokenProcessPool

    class Breaking(_FakePool):
        error = None

        def submit(self, fn, *args):
            if self.error is not None:
                raise self.error
            return super().submit(fn, *args)

    monkeypatch.setattr(precompile, "ProcessPoolExecutor", Breaking)
    for error in (BrokenProcessPool("a child process terminated abruptly"), OSError(12, "Cannot allocate memory")):
        compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=2)
        compiler.prewarm("cpu", ())
        pool = compiler.pool
        pool.error = error
        for future in pool.futures:  # the warm-ups end (a dead process fails them)
            future.set_exception(RuntimeError("warm-up ended"))
        for name in ("a", "b"):
            compiler._submit(*_job(tmp_path, name, 1, True))
            _wait_for(lambda: compiler.futures[str(tmp_path / f"{name}.aot")].done())
        compiler.flush()
        assert compiler.stats["failed"] == 2 and not compiler.pending() and compiler.pool is None
        compiler._submit(*_job(tmp_path, "c", 1, True))
        assert compiler.pool is not pool
        _wait_for(lambda: len(compiler.pool.handed) == 1)
        compiler.pool.futures[0].set_result(1.0)
        compiler.flush()
        assert compiler.stats["compiled"] == 1


def test_closing_stops_processes_still_warming_up(tmp_path, monkeypatch):
    """A launch that ends (an error building the models, say) while its processes still warm up stops them rather
    than waiting for their warm-ups at the exit."""
    stopped = []

    class Process:
        def terminate(self):
            stopped.append(self)

    class WithProcesses(_FakePool):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self._processes = {i: Process() for i in range(2)}

    monkeypatch.setattr(precompile, "ProcessPoolExecutor", WithProcesses)
    compiler = precompile.Precompiler(tmp_path, "aot_eager", workers=2)
    compiler.prewarm("cpu", ())
    compiler.pool.futures[0].set_result(1.0)  # one warm-up done, one still running
    compiler.close()
    assert len(stopped) == 2
    compiler.prewarm("cpu", ())
    for future in compiler.pool.futures:
        future.set_result(1.0)
    compiler.close()  # idle processes: shut down without being killed
    assert len(stopped) == 2


def test_a_worker_ignores_ctrl_c_and_exits_when_the_training_process_is_gone():
    """Each worker leaves Ctrl-C to the training process and watches it: a training process killed without stopping
    its workers does not leave them compiling (and holding a CUDA context) on their own."""
    code = ("import sys, time; from prodistill.accel.precompile import _start_worker; "
            "_start_worker(int(sys.argv[1])); print('watching', flush=True); time.sleep(8)")
    gone = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1  # its parent is not pid 1, so "gone": it left before its work (which exits 0)
    alive = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline() == "watching\n"
        alive.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the workers too: theirs to ignore
        time.sleep(2.5)
        assert alive.poll() is None  # its parent is still there: it keeps working
    finally:
        alive.kill()
        alive.wait()


def test_a_run_that_ends_first_waits_for_its_background_variants_not_its_own_queue(tmp_path, monkeypatch, caplog):
    """`finish_background` (the end of `prodistill train`): variants still compiling in the background are waited
    for and saved, so that the next launch loads them (a short run used to drop them); a one-worker compiler's
    queue is left to the next launch (compiling it here would be the run's whole compile)."""
    import threading

    monkeypatch.setattr(precompile, "ProcessPoolExecutor", _FakePool)
    monkeypatch.setattr(precompile, "_SHARED", {})
    background = precompile.Precompiler.shared(tmp_path / "a", "aot_eager", 2)
    own = precompile.Precompiler.shared(tmp_path / "b", "aot_eager", 1)
    background._submit(*_job(tmp_path, "bg", 1, True))
    own.queue["x.aot"] = _job(tmp_path, "own", 1, True)[1]
    _wait_for(lambda: len(background.pool.handed) == 1)
    counted = []
    with caplog.at_level(logging.INFO, logger="prodistill"):
        waiting = threading.Thread(target=lambda: counted.append(precompile.finish_background()))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()  # it waits for the variant under way
        background.pool.futures[0].set_result(1.0)
        waiting.join(10)
    assert counted == [1] and background.stats["compiled"] == 1 and not background.pending()
    assert "1 region variants are still compiling in the background: waiting for them" in caplog.text
    assert list(own.queue) == ["x.aot"] and own.stats["compiled"] == 0
    assert precompile.finish_background() == 0
