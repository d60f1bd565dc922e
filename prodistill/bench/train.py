"""`prodistill bench train`: the training step in several configurations, side by side in one process.

Configurations (always run in this order, because compiling changes the shared teacher for what follows):
- `plain`: the same iteration as a plain diffusers script (`prodistill.bench.plain`), the yardstick;
- `eager-pixels`: prodistill's step, eager, encoding each clip with the VAE and CLIP inside the step;
- `eager`: prodistill's step, eager, from latent-cache batches (the fast data path);
- `graphs`: eager, with the teacher's m-step solve replayed as a CUDA graph (GPU only);
- `compile-teacher+graphs`: only the teacher's regions compiled (`--compile teacher`), its solve graphed;
- `compile`: regional torch.compile (`prodistill.accel`);
- `compile+graphs`: plus the teacher's m-step solve replayed as a CUDA graph (GPU only);
- `CONFIG+fp8-BACKEND` (CONFIG any of the above but plain and eager-pixels; BACKEND te, torchao or emulate): CONFIG
  with `--fp8 --fp8-backend BACKEND`, run right after CONFIG; te and torchao need a Hopper GPU and their package,
  emulate (plain-torch FP8 numerics, slower than bf16) runs anywhere. Each row says how many Linears ran FP8, and
  `--explain` lists every layer with the table row that decided (`prodistill.accel.fp8`).

Per configuration: median s/it over `iters` timed iterations after `warmup` untimed ones (the first of which
is reported as the warm-up/compile time), peak allocated and reserved GPU memory of the timed iterations (the
warm-up's — eager steps while compiling, graph captures — apart, `startup_peak_*`), TFLOP per iteration counted
by `torch.utils.flop_counter.FlopCounterMode` on an eager iteration (never estimated), MFU against the
device's dense bf16 peak, and the speed-up over `plain` measured in the same run. Times on CPU only show that
the harness works; the figures that count are on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from prodistill.atomic import atomic_write_text
from prodistill.bench.profile import (add_phase_rates, breakdown, flop_counter, format_breakdown, format_idle,
                                      idle_gaps, phase_cpu_ms, phase_ranges, time_ms)

DEFAULT_CONFIGS = ("plain", "eager-pixels", "eager", "graphs", "compile-teacher+graphs", "compile", "compile+graphs")
CONFIGS = (*DEFAULT_CONFIGS, "compile+graphs+fused", "compile+graphs+cfg2b", "compile+graphs+nhwc",
           "compile+graphs+solve-graph", "compile+graphs+conv-gemm", "compile+graphs+no-rewrites",
           "compile+graphs+train-graphs")
"""`+fused`: the `ops/` kernels (latent upsampler, pseudo-Huber) on top of compile+graphs; `+cfg2b`: the
teacher's CFG as one batch-2B call (`--split-cfg off`) where compiling every network otherwise splits it into
two batch-B calls (`--split-cfg auto`); `+nhwc`: channels-last conv weights (`--channels-last`); `+solve-graph`:
only the teacher's solve graphed, the EMA target's forward eager; `+conv-gemm`: the experimental exact rewrite of
the temporal convolutions as GEMMs (`prodistill.accel.rewrites.TemporalGemmConv3d`); `+no-rewrites`: without the exact rewrites
(`--exact-rewrites off`), which every other configuration but plain has as the default of one process;
`+train-graphs`: the student's and the discriminator's passes with their backward as CUDA graphs too
(`prodistill.accel.graphs.GraphedTrainCall`, single process)."""
FP8_BACKENDS = ("te", "torchao", "emulate")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0}
"""Dense bf16 tensor-core peak by GPU name fragment (NVIDIA datasheets, SXM)."""


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def split_config(name: str) -> tuple[str, str | None]:
    """`compile+fp8-torchao` → (`compile`, `torchao`); a configuration without FP8 → (name, None)."""
    base, _, backend = name.partition("+fp8-")
    return base, backend or None


PLAIN_METHODS = ("osv", "lcm")
"""Methods whose iteration `prodistill.bench.plain` writes as the plain-script yardstick."""


def _needs_cuda(config: str) -> bool:
    return "graphs" in config or "fused" in config


def parse_configs(text: str | None, device: torch.device, method: str = "osv") -> list[str]:
    """The configurations of `--configs` (None: `DEFAULT_CONFIGS`, without plain for a method that has no
    yardstick and, off CUDA, without those that need a GPU), checked and in canonical order."""
    from prodistill.accel.fp8 import check_available

    if text is None:
        text = ",".join(c for c in DEFAULT_CONFIGS if (c != "plain" or method in PLAIN_METHODS)
                        and (device.type == "cuda" or not _needs_cuda(c)))
    names = [c.strip() for c in text.split(",") if c.strip()]
    if "plain" in names and method not in PLAIN_METHODS:
        raise ValueError(f"--configs plain: the plain-script yardstick exists for {' and '.join(PLAIN_METHODS)} only; "
                         f"leave it out for --method {method}")
    parts = {c: split_config(c) for c in names}
    no_fp8 = ("plain", "eager-pixels")
    unknown = [c for c, (base, fp8) in parts.items()
               if base not in CONFIGS or (fp8 is not None and (fp8 not in FP8_BACKENDS or base in no_fp8))]
    if unknown:
        raise ValueError(f"--configs: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}, "
                         f"each but plain and eager-pixels optionally with +fp8-{'|'.join(FP8_BACKENDS)}")
    if any(_needs_cuda(base) for base, _ in parts.values()) and device.type != "cuda":
        raise ValueError("--configs with graphs or fused need --device cuda (CUDA graphs, Triton kernels); leave "
                         "them out on the CPU")
    for name, (_, fp8) in parts.items():
        if fp8 is not None:
            try:
                check_available(fp8, device)
            except ValueError as e:
                raise ValueError(f"--configs {name}: {e}") from None

    def order(name: str) -> tuple[int, int]:  # each FP8 variant right after its configuration
        base, fp8 = parts[name]
        return CONFIGS.index(base), -1 if fp8 is None else FP8_BACKENDS.index(fp8)

    return sorted(set(names), key=order)


def synthetic_batches(cfg, models, generator: torch.Generator) -> tuple[dict, dict]:
    """(a latent-cache batch, a pixel batch) of the configured shape, random, on the models' device."""
    w, h = cfg.size()
    shape = models.latent_shape(cfg.batch_size, cfg.frames, w, h)
    dev = models.device
    embed_dim = models.image_encoder.config.projection_dim

    def rand(*s):
        return torch.randn(*s, generator=generator, device=dev)

    cached = {"latent_mean": rand(*shape), "latent_std": rand(*shape).abs() * 0.1,
              "image_embeds": rand(cfg.batch_size, 1, embed_dim), "image_latent": rand(*shape[:1], *shape[2:])}
    pixels = {"pixels": torch.rand(cfg.batch_size, cfg.frames, 3, h, w, generator=generator, device=dev) * 2 - 1}
    return cached, pixels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(name: str, cfg, models, device: torch.device):
    """(a callable running one iteration of configuration `name`, its networks built fresh, on its batch;
    the FP8 plan of every Linear layer, empty without FP8; the networks it runs; the method, None for plain)."""
    from prodistill.accel import Speedups, accelerate, method_networks, recover_from_oom
    from prodistill.bench.plain import PlainStep
    from prodistill.methods import build_method
    from prodistill.training import distributed
    from prodistill.training.logger import MetricsLogger
    from prodistill.training.trainer import Trainer

    dist = distributed.active()  # under `bench train --nproc N` (prodistill.bench.scaling): this rank, DDP
    generator = torch.Generator(device).manual_seed(dist.rank_seed(cfg.seed))
    cached, pixels = synthetic_batches(cfg, models, torch.Generator(device).manual_seed(dist.rank_seed(cfg.seed + 1)))
    torch.manual_seed(cfg.seed)
    if name == "plain":
        step = PlainStep(cfg, models, generator)
        return lambda: step(cached), [], [], None
    stage = cfg.stages()[0]
    method = build_method(cfg, models, stage, generator)
    base, fp8 = split_config(name)
    scope = "teacher" if "teacher" in base else "all" if base.startswith("compile") else "off"
    defaults = Speedups.from_config(cfg, device)
    speedups = replace(defaults, compile=scope, cuda_graphs="graphs" in base,
                       graph_ema="graphs" in base and "solve-graph" not in base and defaults.graph_ema,
                       graph_train="train-graphs" in base and defaults.graph_ema,
                       channels_last=defaults.channels_last or "nhwc" in base,
                       rewrites=runs_rewrites(name, cfg, device), fused_ops="fused" in base,
                       temporal_gemm="conv-gemm" in base and runs_rewrites(name, cfg, device),
                       split_cfg=scope == "all" and "cfg2b" not in base, fp8=fp8 is not None, fp8_backend=fp8 or "auto")
    plans = accelerate(method, models, speedups)
    dist.wrap(method, models)
    trainer = Trainer(cfg, method, None, stage, Path(cfg.out), 1, generator, MetricsLogger(Path(cfg.out)), dist=dist,
                      on_oom=recover_from_oom)
    batch = pixels if name == "eager-pixels" else cached
    # the method's own networks first: a fresh student is wrapped by this configuration's compiler, the shared
    # teacher by the first configuration's
    networks = [m for m in method_networks(method, models) if m is not models.teacher] + [models.teacher]
    return lambda: trainer.train_step([batch]), plans, networks, method


def precompiler(networks):
    """The ahead-of-time compiler wrapping regions of the first of `networks` it wraps, or None."""
    from prodistill.accel.precompile import RegionCall

    for net in networks:
        for module in net.modules():
            call = vars(module).get("forward")
            if isinstance(call, RegionCall):
                return call.compiler
    return None


def _counts(stats: dict) -> dict:
    """The precompiler's counters now, and for its lists (timed variants) their lengths."""
    return {k: len(v) if isinstance(v, list) else v for k, v in stats.items()}


def since(stats: dict, before: dict) -> dict:
    """What the precompiler did since `before = _counts(stats)`: counters' differences, lists' new entries."""
    return {k: v[before[k]:] if isinstance(v, list) else v - before[k] for k, v in stats.items()}


def precompile_stats(networks) -> dict:
    """The ahead-of-time compiler's counters (variants compiled and loaded, seconds), or {} when none is used."""
    compiler = precompiler(networks)
    return dict(compiler.stats) if compiler is not None else {}


def _describe_aot(aot: dict) -> str:
    if not aot:
        return ""
    return (f"; ahead of time: {aot['compiled']} variants compiled in {aot['compile_s']:.1f} s, {aot['loaded']} "
            f"loaded in {aot['load_s']:.1f} s, {aot['failed']} failed")


def count_tflop(step) -> float:
    with flop_counter() as counter:
        step()
    return counter.get_total_flops() / 1e12


def _until_compiled(step, compiler) -> int:
    """Run `step` while the ahead-of-time `compiler` (None: none) still compiles in the background, the steps
    running eagerly meanwhile; returns how many ran."""
    steps = 0
    while compiler is not None and compiler.pending():
        step()
        steps += 1
    return steps


def seconds_since_launch() -> float | None:
    """Wall seconds since this process started (from Linux's /proc; None elsewhere), so that the bench can say
    how long a user waits from the command to a step at speed: imports and model building included."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_config(name: str, cfg, models, device: torch.device, warmup: int, iters: int, echo=print) -> dict:
    step, plans, networks, _ = _make_step(name, cfg, models, device)
    compiler = precompiler(networks)
    before = _counts(compiler.stats) if compiler is not None else {}  # shared by the configurations of one run
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    eager_steps = _until_compiled(step, compiler)
    for _ in range(warmup - 1):
        step()
    _sync(device)
    startup = time.perf_counter() - t0
    at_speed = seconds_since_launch()
    memory = {}
    if device.type == "cuda":  # the warm-up's peak (eager steps while compiling, captures), then the timed steps'
        memory = {"startup_peak_alloc_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                  "startup_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    row = {"config": name, "sec_per_it": statistics.median(times), "sec_min": min(times), "sec_max": max(times),
           "first_iter_s": first, "warmup_s": startup, "eager_steps_while_compiling": eager_steps, **memory}
    if at_speed is not None:
        row["at_speed_since_launch_s"] = at_speed
    aot = since(compiler.stats, before) if compiler is not None else {}  # this configuration's share
    if aot:
        row["aot"] = aot
    if device.type == "cuda":
        row["peak_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    row["rewrites"] = runs_rewrites(name, cfg, device)
    if name in ("plain", "eager", "eager-pixels"):  # the others do the math of eager (plain without the exact
        row["tflop_per_it"] = count_tflop(step)   # rewrites), and a graph replay would hide its work from a counter
    if plans:
        from prodistill.accel import fp8

        row["fp8"], row["fp8_layers"] = fp8.summary(plans), fp8.explain(plans)
    during = f", {eager_steps} eager steps while compiling" if eager_steps else ""
    echo(f"  {name}: {row['sec_per_it']:.3f} s/it (first iteration {first:.1f} s, at speed after {startup:.1f} s: "
         f"{warmup} warm-up iterations{during}{_describe_aot(aot)})")
    return row


def runs_rewrites(name: str, cfg, device: torch.device) -> bool:
    """Whether configuration `name` runs the exact rewrites (`prodistill.accel.rewrites`), which skip work: its
    FLOPs are those of eager with them, plain's (the original UNet's) without."""
    from prodistill.accel import Speedups

    return name != "plain" and "no-rewrites" not in name and Speedups.from_config(cfg, device).rewrites


def _same_work_tflop(rows: list[dict], rewrites: bool) -> float | None:
    """The FLOP count of a counted row (eager or plain) doing the math of a configuration with/without rewrites."""
    return next((r["tflop_per_it"] for r in rows if r["config"] in ("eager", "plain") and r["rewrites"] == rewrites
                 and "tflop_per_it" in r), None)


def count_eager_tflop(cfg, models, device: torch.device, rewrites: bool) -> float:
    """TFLOP of one eager iteration, regions uncompiled, with or without the exact rewrites."""
    from prodistill.accel import method_networks

    step, _, _, method = _make_step("eager" if rewrites else "eager+no-rewrites", cfg, models, device)
    with _uncompiled(method_networks(method, models)):
        return count_tflop(step)


def run_train_bench(cfg, device: torch.device, configs: list[str], warmup: int, iters: int,
                    explain: bool = False, echo=print, on_row=None, trace: Path | None = None) -> dict:
    """All `configs` in order; `on_row(result)` after each (the CLI saves the JSON, so a run stopped midway
    keeps what it measured); with `explain`, the profiled step's trace goes to `trace` if given."""
    from prodistill.accel import Speedups, start_compile_workers
    from prodistill.accel.compile import inductor_options
    from prodistill.training.run import build_models

    if any(name.startswith("compile") for name in configs):
        start_compile_workers(Speedups.from_config(cfg, device), device)  # a cold cache: they import meanwhile
    echo(f"building {cfg.preset} models on {device} ...")
    launch = {"before_models_s": seconds_since_launch()}
    start = time.perf_counter()
    models = build_models(cfg, device)
    _sync(device)  # the models' initialisation kernels are part of building them
    launch["build_models_s"] = time.perf_counter() - start
    peak = device_peak_tflops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": cfg.preset, "method": cfg.method, "stage": cfg.stages()[0], "resolution": cfg.resolution,
              "frames": cfg.frames, "batch_size": cfg.batch_size, "solver_steps": cfg.solver_steps,
              "lora_rank": cfg.lora_rank, "peak_tflops": peak, "torch": torch.__version__,
              "inductor_options": inductor_options(), "cuda_env": cuda_env(), "rows": []}
    if launch["before_models_s"] is not None:
        result["launch"] = launch
    for name in configs:
        echo(f"{name} ...")
        row = run_config(name, cfg, models, device, warmup, iters, echo)
        if "tflop_per_it" not in row:  # the same math's count, or counted now on an eager step of that math
            row["tflop_per_it"] = (_same_work_tflop(result["rows"], row["rewrites"])
                                   or count_eager_tflop(cfg, models, device, row["rewrites"]))
        result["rows"].append(row)
        _derive(result)
        if on_row is not None:
            on_row(result)
    if explain:
        # the fastest of prodistill's configurations (the plain yardstick only when it ran alone)
        ours = [r for r in result["rows"] if r["config"] != "plain"] or result["rows"]
        best = min(ours, key=lambda r: r["sec_per_it"])["config"]
        result["explain"] = explain_step(cfg, models, device, best, echo, trace=trace)
        result["explain"]["fp8"] = {r["config"]: r["fp8_layers"] for r in result["rows"] if "fp8_layers" in r}
    return result


def _derive(result: dict) -> None:
    plain = next((r for r in result["rows"] if r["config"] == "plain"), None)
    for r in result["rows"]:
        flops = r.get("tflop_per_it")
        if flops and result["peak_tflops"]:
            r["mfu"] = flops / r["sec_per_it"] / result["peak_tflops"]
        if plain:
            r["speedup_vs_plain"] = plain["sec_per_it"] / r["sec_per_it"]


def explain_step(cfg, models, device: torch.device, best: str, echo=print, trace: Path | None = None) -> dict:
    """Dynamo's graph and recompile counts of the run, the SDPA backend table at the step's attention shapes
    (GPU), and profiler tables of configuration `best`: its top kernels, its aten ops by input shape, and (GPU)
    the step's time by phase and kernel family and when the GPU sat idle and why (`prodistill.bench.profile`);
    the profiled step's timeline is written to `trace` (Chrome trace format, gzipped if it ends in .gz; open it in
    Perfetto) if given."""
    from torch._dynamo.utils import counters

    from prodistill.accel.attention import measure, svd_attention_shapes

    out = {"dynamo": {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                      "graph_breaks": sum(counters["graph_break"].values()),
                      "recompiles": dict(counters.get("recompiles", {}))}}
    if device.type == "cuda":
        w, h = cfg.size()
        echo("measuring SDPA backends ...")
        out["sdpa"] = measure(svd_attention_shapes(cfg.batch_size, cfg.frames, w, h), device)
    echo(f"profiling {best} ...")
    step, _, networks, method = _make_step(best, cfg, models, device)
    compiler = precompiler(networks)
    step()
    _until_compiled(step, compiler)  # profile the compiled step, not the eager stand-in
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with phase_ranges(method) if method is not None else contextlib.nullcontext():
        _sync(device)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            step()
            _sync(device)
            wall = time.perf_counter() - t0
    if trace is not None:
        prof.export_chrome_trace(str(trace))
        out["trace"] = str(trace)
        echo(f"profiled step's timeline: {trace}")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out["profile"] = prof.key_averages().table(sort_by=sort, row_limit=25)
    # aten ops by input shape: which convolution / matmul shapes the time goes to (ops inside a CUDA-graph replay
    # are not listed; the student's forward and backward run the teacher's layer shapes at batch B)
    out["ops_by_shape"] = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30)
    out["phase_cpu_ms"] = phase_cpu_ms(prof)
    out["phase_tflop"] = phase_tflop(cfg, models, device)  # after the tables: the profiler's events are read lazily
    if device.type == "cuda":
        out["breakdown"] = add_phase_rates(breakdown(prof, wall), out["phase_tflop"], device_peak_tflops(device))
        out["breakdown"]["phase_cpu_ms"] = out["phase_cpu_ms"]
        out["idle"] = idle_gaps(prof)
        echo(format_breakdown(out["breakdown"]))
        echo(format_idle(out["idle"]))
    if method is not None and hasattr(method, "teacher_solve"):
        out["teacher_evaluation"] = teacher_evaluation_ms(cfg, models, method, device)
        t = out["teacher_evaluation"]
        echo(f"one guided teacher evaluation (both CFG branches, {'GPU' if t['gpu'] else 'wall'} time): {t['ms']:.1f} ms; "
             f"the solve's m = {t['m']} of them take at least {t['solve_floor_ms']:.1f} ms of every step")
    return out


def teacher_evaluation_ms(cfg, models, method, device: torch.device, reps: int = 20) -> dict:
    """The time of one CFG-guided teacher evaluation as the solve makes it (the compiled teacher, the step's batch and
    `--split-cfg`), median of `reps` (`prodistill.bench.profile.time_ms`: on CUDA GPU time, of CUDA-graph replays where
    the call can be captured; on the CPU wall time). The solve makes m of them, so m times this is what the teacher
    costs a step however well the rest overlaps (SPEC §6's step target at 512² is below it on an H200: README, run S)."""
    from prodistill.diffusion.solvers import frame_guidance, guided_denoiser

    solve = method.teacher_solve
    solve = getattr(solve, "fn", solve)  # a CUDA-graph wrapper (`prodistill.accel.graphs.GraphedCall`) around it
    generator = torch.Generator(device).manual_seed(cfg.seed)
    cached, _ = synthetic_batches(cfg, models, generator)
    x0, cond = models.prepare_batch(cached, cfg.fps, generator)
    b = x0.shape[0]
    guidance = frame_guidance(cfg.guidance_min, cfg.guidance_max, b, x0.shape[1], device)
    teacher = guided_denoiser(solve.teacher_d, cond, cond.unconditional(), guidance, split=solve.split_cfg)
    sigma = torch.ones(b, device=device)
    x = x0 + torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    with torch.no_grad():
        ms = time_ms(device, lambda: teacher(x, sigma), reps, warmup=1)
    return {"ms": ms, "m": cfg.solver_steps, "solve_floor_ms": cfg.solver_steps * ms, "gpu": device.type == "cuda"}


@contextlib.contextmanager
def _uncompiled(networks):
    """Inside the block every module of `networks` runs its class's eager forward (compiled regions unwrapped)."""
    saved = []
    for net in networks:
        for module in net.modules():
            call = vars(module).get("forward")
            if call is not None:
                saved.append((module, call))
                del module.forward
    try:
        yield
    finally:
        for module, call in saved:
            module.forward = call


def phase_tflop(cfg, models, device: torch.device) -> dict[str, float]:
    """TFLOP of each phase of one eager iteration (`prodistill.bench.profile.phase_ranges`; `rest`: the backward
    passes, optimisers and losses), counted with `FlopCounterMode` with every region uncompiled."""
    from prodistill.accel import method_networks

    step, _, _, method = _make_step("eager", cfg, models, device)
    flops: dict[str, float] = {}
    with _uncompiled(method_networks(method, models)), phase_ranges(method, flops), flop_counter() as total:
        step()
    flops["rest"] = total.get_total_flops() / 1e12 - sum(flops.values())
    return flops


CUDA_ENV = ("CUDA_SCALE_LAUNCH_QUEUES", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF")
"""Environment variables that change how the CUDA driver or torch's allocator run the same step (each read once, when
CUDA starts), so two runs' figures are comparable only with them named."""


def cuda_env() -> dict[str, str]:
    return {k: os.environ[k] for k in CUDA_ENV if os.environ.get(k)}


def format_train_table(r: dict) -> str:
    width = max([16] + [len(row["config"]) + 2 for row in r["rows"]])
    env = "".join(f", {k}={v}" for k, v in r.get("cuda_env", {}).items())
    lines = [f"bench train: {r['method']} stage {r['stage']}, {r['preset']}, {r['resolution']}, {r['frames']} frames, "
             f"batch {r['batch_size']}, m={r['solver_steps']}, LoRA r={r['lora_rank']} on {r['device']} "
             f"(torch {r['torch']}{env})",
             f"{'config':{width}}{'s/it':>9}{'×plain':>8}{'TFLOP/it':>10}{'MFU':>8}{'peak GB':>9}{'reserved':>10}"
             f"{'1st it s':>10}{'steady s':>10}"]
    for row in r["rows"]:
        def fmt(key, width, digits, scale=1.0, unit=""):
            v = row.get(key)
            return f"{v * scale:.{digits}f}{unit}".rjust(width) if v is not None else "-".rjust(width)

        lines.append(f"{row['config']:{width}}{fmt('sec_per_it', 9, 3)}{fmt('speedup_vs_plain', 8, 2)}"
                     f"{fmt('tflop_per_it', 10, 1)}{fmt('mfu', 8, 1, 100, '%')}{fmt('peak_alloc_gb', 9, 1)}"
                     f"{fmt('peak_reserved_gb', 10, 1)}{fmt('first_iter_s', 10, 1)}{fmt('warmup_s', 10, 1)}")
    lines += [f"{row['config']}: {row['fp8']}" for row in r["rows"] if "fp8" in row]
    graphed = [row["config"] for row in r["rows"] if "+train-graphs" in row["config"] and "peak_alloc_gb" in row]
    if graphed:  # a replay allocates nothing: the graphed passes' activations sit in pools reserved at capture
        lines.append(f"peak GB of {', '.join(graphed)}: without the student's and discriminator's activations, which "
                     "live in their CUDA graphs' pools (a replay allocates nothing); reserved is the step's footprint")
    launch, first = r.get("launch"), (r["rows"] or [{}])[0]
    if launch and "at_speed_since_launch_s" in first:
        lines.append(f"launch: {launch['before_models_s']:.1f} s of imports and set-up, models built in "
                     f"{launch['build_models_s']:.1f} s, {first['config']} at speed "
                     f"{first['at_speed_since_launch_s']:.1f} s after the process started")
    if r["peak_tflops"] is None:
        lines.append("MFU: no bf16 peak known for this device (CPU times only show that the harness runs)")
    return "\n".join(lines)


def write_train_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return path


def trace_path(json_path: Path) -> Path:
    """Where `--explain` writes the profiled step's timeline: beside the JSON, `NAME.trace.json.gz`."""
    return json_path.with_name(json_path.name.removesuffix(".json") + ".trace.json.gz")
