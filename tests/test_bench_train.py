"""`prodistill bench train` on the tiny preset, CPU: the harness end to end, and the plain yardstick doing the
same work as prodistill's step (counted FLOPs)."""

from __future__ import annotations

import gzip
import inspect
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from prodistill.bench.train import (_counts, count_eager_tflop, format_train_table, parse_configs, run_train_bench, since,
                                    trace_path)
from prodistill.training.run import build_models


def test_bench_train_runs_every_cpu_config_and_counts_the_same_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PRODISTILL_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("CUDA_SCALE_LAUNCH_QUEUES", "4x")  # recorded with the figures: it changes the CUDA driver's queues
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    cfg = tiny_config(tmp_path, stage="2", compile_cache=str(tmp_path / "cache"))
    configs = parse_configs("compile,eager,plain,eager-pixels", torch.device("cpu"))
    assert configs == ["plain", "eager-pixels", "eager", "compile"]  # canonical order, whatever was asked
    saved = []
    trace = trace_path(tmp_path / "bench.json")
    result = run_train_bench(cfg, torch.device("cpu"), configs, warmup=1, iters=1, explain=True,
                             echo=lambda *_: None, on_row=lambda r: saved.append(len(r["rows"])), trace=trace)
    rows = {r["config"]: r for r in result["rows"]}
    assert saved == [1, 2, 3, 4]
    assert all(r["sec_per_it"] > 0 and r["first_iter_s"] > 0 for r in rows.values())
    # the yardstick does prodistill's work without the exact rewrites, which skip some (the one-key attention's
    # query/key projections and output projection over every token); encoding inside the step adds the encoders'
    assert rows["plain"]["tflop_per_it"] > rows["eager"]["tflop_per_it"] > 0.9 * rows["plain"]["tflop_per_it"]
    assert rows["eager"]["rewrites"] and not rows["plain"]["rewrites"]
    models = build_models(cfg, torch.device("cpu"))
    assert count_eager_tflop(cfg, models, torch.device("cpu"), rewrites=False) == pytest.approx(
        rows["plain"]["tflop_per_it"], rel=1e-6)
    assert count_eager_tflop(cfg, models, torch.device("cpu"), rewrites=True) == pytest.approx(
        rows["eager"]["tflop_per_it"], rel=1e-6)
    assert rows["eager-pixels"]["tflop_per_it"] > rows["eager"]["tflop_per_it"]
    assert rows["compile"]["tflop_per_it"] == rows["eager"]["tflop_per_it"]
    assert rows["eager"]["speedup_vs_plain"] == pytest.approx(rows["plain"]["sec_per_it"] / rows["eager"]["sec_per_it"])
    assert "mfu" not in rows["eager"]  # no peak for a CPU
    assert result["explain"]["dynamo"]["graph_breaks"] == 0 and "profile" in result["explain"]
    assert "aten::convolution" in result["explain"]["ops_by_shape"] and "Input Shapes" in result["explain"]["ops_by_shape"]
    flops = result["explain"]["phase_tflop"]  # by phase, on an eager step with the regions uncompiled
    assert sum(flops.values()) == pytest.approx(rows["eager"]["tflop_per_it"], rel=1e-6)
    # the teacher's 2m guided forwards against the student's one (LoRA adds a little to the student's)
    assert 1.5 * cfg.solver_steps < flops["teacher solve"] / flops["student forward"] <= 2 * cfg.solver_steps
    assert flops["EMA target"] == pytest.approx(flops["student forward"], rel=1e-6) and flops["rest"] > 0
    cpu_ms = result["explain"]["phase_cpu_ms"]  # the profiled step's ranges, each phase met
    assert set(cpu_ms) == {"teacher solve", "student forward", "EMA target", "discriminator forward"}
    assert all(v > 0 for v in cpu_ms.values())
    assert trace.name == "bench.trace.json.gz" and result["explain"]["trace"] == str(trace)
    with gzip.open(trace, "rt") as f:  # the profiled step's timeline, phases included, for Perfetto
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "phase: teacher solve" in names and "phase: student forward" in names
    teacher = result["explain"]["teacher_evaluation"]  # what one guided evaluation of the compiled teacher takes
    assert teacher["ms"] > 0 and teacher["m"] == cfg.solver_steps and not teacher["gpu"]
    assert teacher["solve_floor_ms"] == pytest.approx(cfg.solver_steps * teacher["ms"])
    table = format_train_table(result)
    assert "compile" in table and "plain" in table and "no bf16 peak" in table
    assert result["cuda_env"] == {"CUDA_SCALE_LAUNCH_QUEUES": "4x"} and ", CUDA_SCALE_LAUNCH_QUEUES=4x)" in table
    # from the process's start: imports, the models, then the first configuration's first steps (10 ms ticks)
    launch, first = result["launch"], result["rows"][0]
    assert launch["before_models_s"] > 0 and launch["build_models_s"] > 0
    assert first["at_speed_since_launch_s"] >= (launch["before_models_s"] + launch["build_models_s"]
                                                + first["warmup_s"] - 0.05)
    at_speed = [r["at_speed_since_launch_s"] for r in result["rows"]]
    assert at_speed == sorted(at_speed)
    assert f"plain at speed {first['at_speed_since_launch_s']:.1f} s after the process started" in table


def test_seconds_since_launch_counts_from_the_process_start():
    """In a fresh interpreter that sleeps 0.5 s first (the function's own source, without importing torch), and
    across a sleep in this one."""
    from prodistill.bench.train import seconds_since_launch

    code = f"import os, time\ntime.sleep(0.5)\n{inspect.getsource(seconds_since_launch)}\nprint(seconds_since_launch())"
    fresh = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= fresh < 5.0
    before = seconds_since_launch()
    time.sleep(0.3)
    assert 0.25 <= seconds_since_launch() - before <= 2.0


def test_the_table_says_where_graphed_training_passes_keep_their_memory():
    row = {"sec_per_it": 0.8, "tflop_per_it": 226.3, "peak_reserved_gb": 28.6}
    result = {"method": "osv", "stage": "2", "preset": "svd-xt", "resolution": "512x512", "frames": 14,
              "batch_size": 1, "solver_steps": 5, "lora_rank": 64, "device": "GPU", "torch": "2", "peak_tflops": 989.0,
              "rows": [{"config": "compile+graphs", **row, "peak_alloc_gb": 23.7},
                       {"config": "compile+graphs+train-graphs", **row, "peak_alloc_gb": 5.8}]}
    lines = format_train_table(result).splitlines()
    assert lines[-1].startswith("peak GB of compile+graphs+train-graphs: without the student's")
    assert "reserved" in lines[-1]
    result["rows"] = result["rows"][:1]
    assert "peak GB of" not in format_train_table(result)


def test_bench_train_refuses_unknown_and_gpu_only_configs_on_cpu():
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_configs("eager,fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="need --device cuda"):
        parse_configs("eager,compile+graphs", torch.device("cpu"))
    # asked for none: the default list, without what needs a GPU (it asked for graphs the user never named)
    assert parse_configs(None, torch.device("cpu")) == ["plain", "eager-pixels", "eager", "compile"]


def test_unwritable_places_are_refused_before_any_model_is_built(tmp_path, monkeypatch):
    """--out, --compile-cache and bench's --json under a file (or where nothing can be written) are one sentence
    each before the models are built, not a traceback at the first write."""
    from click.testing import CliRunner

    from prodistill.cli import main

    monkeypatch.setattr("prodistill.training.run.build_models",
                        lambda *a: pytest.fail("models built before a bad path was refused"))
    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile" / "sub")
    for args, flag in ((["train", "--out", bad], "--out"),
                       (["train", "--out", str(tmp_path / "run"), "--compile", "on", "--compile-cache", bad],
                        "--compile-cache"),
                       (["bench", "train", "--preset", "tiny", "--configs", "eager", "--json", bad + "/b.json"],
                        "--json")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and f"{flag} " in result.output
        assert "is a file, not a folder; choose another " + flag in result.output, result.output
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: only the file case can be checked
        return
    result = CliRunner().invoke(main, ["train", "--out", str(locked / "run")])
    assert "cannot be written (Permission denied" in result.output


def test_a_configurations_flops_are_those_of_the_counted_row_doing_its_math():
    from prodistill.bench.train import _derive, _same_work_tflop

    rows = [{"config": "plain", "sec_per_it": 2.0, "tflop_per_it": 200.0, "rewrites": False},
            {"config": "eager", "sec_per_it": 1.5, "tflop_per_it": 190.0, "rewrites": True}]
    assert _same_work_tflop(rows, False) == 200.0 and _same_work_tflop(rows, True) == 190.0
    assert _same_work_tflop(rows[:1], True) is None  # counted afresh then (count_eager_tflop)
    result = {"peak_tflops": 1000.0, "rows": [*rows, {"config": "compile+graphs", "sec_per_it": 1.0,
                                                       "tflop_per_it": 190.0, "rewrites": True}]}
    _derive(result)
    fast = result["rows"][2]
    assert fast["mfu"] == pytest.approx(0.19) and fast["speedup_vs_plain"] == 2.0


def test_phase_ranges_put_every_callable_back():
    from types import SimpleNamespace

    from prodistill.bench.profile import phase_ranges

    disc = torch.nn.Linear(2, 2)
    solve = lambda x: x + 1  # noqa: E731
    method = SimpleNamespace(teacher_solve=solve, student_d=None, disc=disc)
    with phase_ranges(method), torch.profiler.profile() as prof:
        assert method.teacher_solve(torch.ones(1)).item() == 2 and method.teacher_solve is not solve
        disc(torch.ones(2))
    names = {e.name for e in prof.events()}
    assert {"phase: teacher solve", "phase: discriminator forward"} <= names and "phase: student forward" not in names
    assert method.teacher_solve is solve and "forward" not in vars(disc) and method.student_d is None

    class WithLogits:  # a method whose discriminator is called through `disc_logits` (the call accel may graph)
        student_d = None

        def __init__(self):
            self.disc = disc

        def disc_logits(self, x):
            return self.disc(x)

    method = WithLogits()
    with phase_ranges(method), torch.profiler.profile() as prof:
        method.disc_logits(torch.ones(2))
    assert "phase: discriminator forward" in {e.name for e in prof.events()}
    assert "disc_logits" not in vars(method) and "forward" not in vars(disc)


def test_breakdown_sums_phases_families_and_the_busy_union_by_hand():
    from types import SimpleNamespace

    from prodistill.bench.profile import add_phase_rates, breakdown, family, format_breakdown

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def kernel(name, start, end):
        return SimpleNamespace(name=name, device_type=cuda, time_range=SimpleNamespace(
            start=start, end=end, elapsed_us=lambda: end - start))

    events = [kernel("sm90_xmma_gemm_bf16", 0, 400), kernel("triton_poi_fused_add_0", 300, 500),  # overlap 100
              kernel("flash_fwd_kernel", 1000, 1600), kernel("Memcpy HtoD", 1600, 1700),
              kernel("## Call CompiledFxGraph None ##", 0, 1000),  # inductor's annotation: spans kernels, no kernel
              kernel("Command Buffer Full", 1700, 1900),  # CUPTI's record of a full launch queue
              SimpleNamespace(name="a user range", device_type=cuda, is_user_annotation=True,
                              time_range=SimpleNamespace(start=0, end=1900, elapsed_us=lambda: 1900)),
              SimpleNamespace(name="phase: teacher solve", device_type=cpu, time_range=None),  # CPU side: ignored
              SimpleNamespace(name="phase: teacher solve", device_type=cuda,
                              time_range=SimpleNamespace(start=250, end=1650))]  # GPU side: starts 300-1600
    b = breakdown(SimpleNamespace(events=lambda: events), wall_s=0.002)
    assert b["gpu_busy_ms"] == pytest.approx(1.2) and b["gpu_busy_share"] == pytest.approx(0.6)  # 0-500, 1000-1700
    assert b["kernel_ms"] == pytest.approx(1.3) and b["kernels"] == 4
    assert b["phases_ms"] == pytest.approx({"teacher solve": 0.9, "rest": 0.4})  # triton 0.2 + flash 0.6 + memcpy 0.1
    assert b["families_ms"] == pytest.approx({"GEMM": 0.4, "inductor fused": 0.2, "attention": 0.6,
                                              "memcpy/memset": 0.1})
    assert family("implicit_convolve_sgemm") == "convolution" and family("elementwise_kernel") == "other"
    add_phase_rates(b, {"teacher solve": 1.8e-3, "rest": 0.2e-3, "EMA target": 0.0}, peak_tflops=4.0)
    assert b["phase_rates"]["teacher solve"] == pytest.approx({"tflop": 1.8e-3, "tflops": 2.0, "mfu": 0.5})
    assert b["phase_rates"]["rest"]["tflops"] == pytest.approx(0.5) and "EMA target" not in b["phase_rates"]
    assert "teacher solve 0.0 TFLOP at 2 TFLOP/s (50 % of peak)" in format_breakdown(b)


def test_idle_gaps_attribute_the_gpus_waits_to_what_the_training_thread_ran_by_hand():
    from types import SimpleNamespace

    from prodistill.bench.profile import format_idle, idle_gaps

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cpu, thread=1, parent=None):
        return SimpleNamespace(name=name, device_type=device, thread=thread, cpu_parent=parent,
                               time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))

    solve = event("phase: teacher solve", 0, 1000)
    item = event("aten::item", 1000, 1350)
    events = [solve, event("cudaGraphLaunch", 10, 900, parent=solve), item,
              event("aten::_local_scalar_dense", 1010, 1340, parent=item),  # inside aten::item: not counted again
              event("## Call CompiledFxGraph fq3kz7abcdefghijklmnop ##", 1400, 1600),
              event("aten::mm", 0, 2000, thread=2),  # another thread (a data loader's): not the training thread
              event("gemm_kernel", 50, 900, cuda), event("conv_kernel", 905, 1200, cuda),
              event("triton_poi_fused_0", 1500, 1800, cuda), event("phase: teacher solve", 0, 1000, cuda)]
    g = idle_gaps(SimpleNamespace(events=lambda: events))
    # idle: 0-50 (before the first kernel), 900-905 (a short gap between queued kernels), 1200-1500
    assert g["window_ms"] == pytest.approx(1.8) and g["idle_ms"] == pytest.approx(0.355)
    assert g["gaps"] == 2 and g["gaps_ms"] == pytest.approx(0.35) and g["short_gaps_ms"] == pytest.approx(0.005)
    # 0-50: cudaGraphLaunch from 10 (40 µs), nothing before it (10 µs); 1200-1500: aten::item to 1350 (150 µs),
    # nothing 1350-1400 (50 µs), the compiled graph's call from 1400 (100 µs)
    assert g["by_cpu_op_ms"] == pytest.approx({"aten::item": 0.15, "## Call CompiledFxGraph ##": 0.1,
                                               "Python (between ops)": 0.06, "cudaGraphLaunch": 0.04})
    assert g["by_phase_ms"] == pytest.approx({"outside phases": 0.3, "teacher solve": 0.05})
    assert g["longest"][0] == pytest.approx({"at_ms": 1.2, "ms": 0.3, "after_kernel": "conv_kernel",
                                             "cpu": "aten::item"})
    assert g["longest"][1]["after_kernel"] == "(the step's start)"
    assert "GPU idle 0.4 ms of the profiled 1.8 ms: 0.3 ms in 2 gaps" in format_idle(g)


def test_explain_profiles_the_fastest_of_prodistills_configurations_not_the_yardstick(tmp_path, monkeypatch):
    import prodistill.bench.train as bench

    times = {"plain": 0.5, "eager": 2.0, "compile": 1.0}
    monkeypatch.setattr(bench, "run_config", lambda name, *a, **k: {"config": name, "sec_per_it": times[name],
                                                                  "tflop_per_it": 1.0})
    monkeypatch.setattr(bench, "explain_step", lambda cfg, models, device, best, echo, trace: {"best": best})
    monkeypatch.setattr("prodistill.training.run.build_models", lambda cfg, device: None)
    cfg = tiny_config(tmp_path)
    result = bench.run_train_bench(cfg, torch.device("cpu"), ["plain", "eager", "compile"], 1, 1, explain=True,
                                   echo=lambda *_: None)
    assert result["explain"]["best"] == "compile"  # plain was faster, but it is not prodistill's step


@pytest.mark.parametrize("method", ["mcm", "avdm2"])
def test_bench_train_times_the_other_methods_steps(tmp_path, monkeypatch, method):
    """MCM's and AVDM2's steps run in the harness (eager and compiled), their FLOPs counted — MCM's gradient penalty
    differentiates inside its loss, which FlopCounterMode's module tracking could not follow — and the plain
    yardstick, which exists for OSV and LCM only, is left out of their default and refused when asked for."""
    from prodistill.bench.train import DEFAULT_CONFIGS

    monkeypatch.setenv("PRODISTILL_COMPILE_BACKEND", "eager")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert parse_configs(None, cuda, method) == list(DEFAULT_CONFIGS[1:])
    assert parse_configs(None, cuda, "lcm") == list(DEFAULT_CONFIGS)
    with pytest.raises(ValueError, match="yardstick exists for osv and lcm only"):
        parse_configs("plain,eager", cpu, method)
    cfg = tiny_config(tmp_path, method=method, compile_cache=str(tmp_path / "cache"))
    result = run_train_bench(cfg, cpu, ["eager", "compile"], warmup=1, iters=1, explain=method == "mcm",
                             echo=lambda *_: None)
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["eager"]["tflop_per_it"] > 0 and rows["compile"]["tflop_per_it"] == rows["eager"]["tflop_per_it"]
    assert all(r["sec_per_it"] > 0 for r in rows.values())
    if method == "mcm":
        flops = result["explain"]["phase_tflop"]
        assert sum(flops.values()) == pytest.approx(rows["eager"]["tflop_per_it"], rel=1e-6)
        assert flops["teacher solve"] > 0 and flops["student forward"] > 0


def test_a_rows_precompile_figures_are_its_own_share_of_the_shared_compiler():
    """The configurations of one run share one precompiler: a row reports what it did since the row began."""
    stats = {"compiled": 3, "compile_s": 10.0, "variants": [{"file": "a"}, {"file": "b"}, {"file": "c"}]}
    before = _counts(stats)
    stats["compiled"] += 2
    stats["compile_s"] += 4.5
    stats["variants"] += [{"file": "d"}, {"file": "e"}]
    assert since(stats, before) == {"compiled": 2, "compile_s": 4.5, "variants": [{"file": "d"}, {"file": "e"}]}
