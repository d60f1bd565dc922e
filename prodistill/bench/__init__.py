"""`prodistill bench`: the benchmarks that the project's figures come from.

`quality` runs on CPU: it distils students on an analytic video distribution whose exact denoiser is known
(`prodistill.bench.analytic`) and scores every sampler against the truth (`prodistill.bench.quality`).
Heavy imports happen inside the commands, so `prodistill --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from prodistill.atomic import file_problem


@click.group()
def bench() -> None:
    """Benchmarks (train: the step's speed-ups side by side; fp8: bf16 vs FP8 per Linear shape; sample: teacher vs 1-step student generation;
    quality: the analytic distillation benchmark, CPU; data: decode throughput vs training; serve: the HTTP
    service under load)."""


@bench.command("quality")
@click.option("--quick", is_flag=True,
              help="Smoke-sized run (about 2.5 min on one CPU thread) instead of the full one (about 15).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-quality.json",
              show_default=True, help="Where to write the results.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the PNG plot [default: the --json path with .png].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the mixture, the training and the evaluation.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="CPU threads. Results are reproducible for a given thread count; more than the free cores slows "
                   "the run down many times.")
@click.option("--students", default=None,
              help="Comma-separated students to train (default: all): lcm, osv, osv-m1, osv-no-stage1, mcm. Each "
                   "student's rows equal those of the full run.")
@click.option("--cm-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Timestep scaling of the consistency coefficients of every consistency student (train's --cm-scale).")
@click.option("--cm-sigma-data", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="σ_data of the consistency coefficients (train's --cm-sigma-data).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other training option of every student, as in a config file (repeatable): e.g. "
                   "--set huber_c=0.01 --set ema_decay=0.99.")
def quality_command(quick: bool, json_path: str, plot_path: str | None, seed: int, threads: int,
                    students: str | None, cm_scale: float, cm_sigma_data: float, overrides: tuple[str, ...]) -> None:
    """Distil LCM, OSV and MCM students on a Gaussian-mixture video distribution with an exact teacher and
    report each sampler's distance to the true distribution (table, JSON, PNG)."""
    from dataclasses import replace

    from prodistill.bench.quality import (format_table, parse_overrides, run_quality_bench, save_plot, settings_for,
                                          write_json)

    keys = tuple(k.strip() for k in students.split(",") if k.strip()) if students else None
    png = Path(plot_path) if plot_path else Path(json_path).with_suffix(".png")
    problem = file_problem(json_path, "--json") or file_problem(png, "--plot", ".png")
    if problem is not None:
        raise click.ClickException(problem)
    try:
        settings = replace(settings_for(quick), cm_scale=cm_scale, cm_sigma_data=cm_sigma_data,
                           overrides=parse_overrides(overrides))
        result = run_quality_bench(settings, seed=seed, threads=threads, echo=click.echo, students=keys)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: no result was assembled
        click.echo("bench quality stopped by Ctrl-C; nothing was written", err=True)
        raise SystemExit(130) from None
    click.echo(format_table(result))
    click.echo(f"results: {write_json(result, Path(json_path))}")
    if save_plot(result, png) is None:
        click.echo("plot skipped: matplotlib is not installed (pip install 'prodistill[bench]')")
    else:
        click.echo(f"plot: {png}")
    if "interrupted" in result:  # its checkpoints were temporary: nothing to resume, the rows so far are kept
        click.echo(f"bench quality {result['interrupted']}; the rows measured before it are in {json_path}", err=True)
        raise SystemExit(130)


@bench.command("data")
@click.option("--data", "data_arg", default=None, help="Videos to decode (default: the built-in H.264 clips).")
@click.option("--preset", type=click.Choice(["tiny", "svd-xt"]), default="svd-xt", show_default=True,
              help="Architecture whose training step sets the consumption rate.")
@click.option("--resolution", default="512x512", show_default=True, help="WxH of the clips and the training step.")
@click.option("--frames", type=int, default=14, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Clips per decode batch.")
@click.option("--batches", type=click.IntRange(1), default=10, show_default=True, help="Timed batches per decoder.")
@click.option("--train-steps", type=click.IntRange(1), default=3, show_default=True, help="Timed training steps.")
@click.option("--workers", type=click.IntRange(0), default=4, show_default=True, help="PyAV loader processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-data.json", show_default=True)
def data_command(data_arg, preset, resolution, frames, batch_size, batches, train_steps, workers, device,
                 json_path) -> None:
    """Clips/s of DALI (GPU) and PyAV (CPU) on the same files, next to what the training step consumes."""
    if (problem := file_problem(json_path, "--json")) is not None:
        raise click.ClickException(problem)
    import tempfile

    from prodistill.bench.data import format_data_table, run_data_bench, write_data_json
    from prodistill.config import build_config
    from prodistill.training.run import resolve_device

    try:
        cfg = build_config({"data": data_arg, "preset": preset, "resolution": resolution, "frames": frames,
                            "batch_size": batch_size, "device": device, "log_every": 1})
        dev = resolve_device(cfg.device)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_data_bench(cfg, dev, batches, train_steps, workers, Path(tmp), echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_data_table(result))
    click.echo(f"results: {write_data_json(result, Path(json_path))}")


@bench.command("train")
@click.option("--preset", type=click.Choice(["tiny", "svd-xt"]), default="svd-xt", show_default=True)
@click.option("--resolution", default="512x512", show_default=True, help="WxH of the training step.")
@click.option("--frames", type=int, default=14, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--method", type=click.Choice(["osv", "lcm", "mcm", "avdm2"]), default="osv", show_default=True,
              help="Method whose step is timed (the plain yardstick exists for osv and lcm only).")
@click.option("--stage", type=click.Choice(["1", "2"]), default="2", show_default=True, help="OSV stage.")
@click.option("--configs", default=None,
              help="Comma-separated configurations (run in this order whatever the order given; default: plain "
                   "(osv and lcm only), eager-pixels, eager, graphs, compile-teacher+graphs, compile, compile+graphs); "
                   "add +fp8-te, +fp8-torchao or +fp8-emulate to any but plain and eager-pixels (e.g. eager+fp8-te, "
                   "compile-teacher+graphs+fp8-torchao); ablations of compile+graphs: +fused, +cfg2b, +nhwc, "
                   "+solve-graph, +conv-gemm, +no-rewrites, +train-graphs (experimental).")
@click.option("--iters", type=click.IntRange(1), default=10, show_default=True, help="Timed iterations each.")
@click.option("--warmup", type=click.IntRange(1), default=3, show_default=True,
              help="Untimed iterations first (the first one compiles).")
@click.option("--grad-checkpointing", is_flag=True, help="Checkpoint the student's activations (prodistill configs).")
@click.option("--compile-cache", default=None, help="torch.compile cache folder (default: the user cache).")
@click.option("--compile-workers", type=int, default=-1, show_default=True,
              help="As for train: processes compiling region variants ahead of time, in the background when more "
                   "than one (-1: auto; 0: just in time).")
@click.option("--explain", is_flag=True, help="Add dynamo graph/recompile counts, the SDPA backend table, for the "
                                              "fastest of prodistill's configurations a profiled step (top kernels, "
                                              "time by phase and kernel family, when and why the GPU sat idle; its "
                                              "timeline in NAME.trace.json.gz beside --json), and for each +fp8 "
                                              "configuration every Linear layer's FP8 decision and why.")
@click.option("--fp8-table", default=None, help="FP8 per-shape table for the +fp8 configurations (JSON of "
                                                "`prodistill bench fp8`; default: the one shipped in the package).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
              help="Also time the step on this many processes (torchrun, DDP, one GPU each) and report samples/s and "
                   "scaling efficiency against one process, in the same run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-train.json", show_default=True)
def train_command(preset, resolution, frames, batch_size, method, stage, configs, iters, warmup, grad_checkpointing,
                  compile_cache, compile_workers, explain, fp8_table, device, nproc, json_path) -> None:
    """Seconds per iteration, peak memory, TFLOP and MFU of the training step: plain script vs prodistill eager
    vs CUDA-graph teacher solve vs compiled (+ graphs), in one process (SPEC §6); with --nproc N, also on N
    processes under torchrun with samples/s and scaling efficiency."""
    import tempfile

    from prodistill.bench.scaling import ScalingError, format_scaling_table, run_scaling_bench, run_worker, worker_argv
    from prodistill.bench.train import (format_train_table, parse_configs, run_train_bench, trace_path,
                                        write_train_json)
    from prodistill.config import build_config
    from prodistill.training.distributed import launched_by_torchrun
    from prodistill.training.run import resolve_device

    if (problem := file_problem(json_path, "--json")) is not None:
        raise click.ClickException(problem)
    options = dict(preset=preset, resolution=resolution, frames=frames, batch_size=batch_size, method=method,
                   stage=stage, configs=configs, iters=iters, warmup=warmup, grad_checkpointing=grad_checkpointing,
                   compile_cache=compile_cache, compile_workers=compile_workers, fp8_table=fp8_table, device=device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config({"preset": preset, "resolution": resolution, "frames": frames, "method": method,
                                "stage": stage, "batch_size": batch_size, "device": device, "out": tmp,
                                "grad_checkpointing": grad_checkpointing, "compile_cache": compile_cache,
                                "compile_workers": compile_workers, "fp8_table": fp8_table})
            dev = resolve_device(cfg.device)
            names = parse_configs(configs, dev, method)
            if launched_by_torchrun():  # one of the --nproc processes (prodistill.bench.scaling)
                run_worker(cfg, dev, names, warmup, iters, explain, Path(json_path))
                return
            if nproc > 1:
                result = run_scaling_bench(nproc, worker_argv(**options, explain=explain), echo=click.echo)
            else:
                result = run_train_bench(cfg, dev, names, warmup, iters, explain, echo=click.echo,
                                         on_row=lambda r: write_train_json(r, Path(json_path)),
                                         trace=trace_path(Path(json_path)) if explain else None)
    except (ValueError, ScalingError) as e:
        raise click.ClickException(str(e)) from e
    if explain:
        click.echo(result["explain"]["profile"])
        click.echo(result["explain"].get("ops_by_shape", ""))
        for name, listing in result["explain"]["fp8"].items():
            click.echo(f"{name}:\n{listing}")
    click.echo(format_train_table(result))
    if nproc > 1:
        click.echo(format_scaling_table(result))
    click.echo(f"results: {write_train_json(result, Path(json_path))}")


@bench.command("fp8")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-fp8.json", show_default=True,
              help="Where to write the table (the format --fp8-table and prodistill/accel/fp8_table.json hold).")
@click.option("--backends", default="te,torchao", show_default=True,
              help="Comma-separated FP8 backends to time against bf16 (te, torchao); a missing one is skipped.")
@click.option("--preset", type=click.Choice(["tiny", "svd-xt"]), default="svd-xt", show_default=True)
@click.option("--resolution", default="512x512", show_default=True, help="WxH of the training step.")
@click.option("--frames", type=int, default=14, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--reps", type=click.IntRange(1), default=30, show_default=True, help="Timed calls per figure (median).")
@click.option("--max-seconds", type=float, default=120.0, show_default=True,
              help="Start no torch.compile measurement of torchao after this many seconds of timing (rows left say "
                   "so): keeps the whole run under 3 minutes on an H100.")
def fp8_command(json_path, backends, preset, resolution, frames, batch_size, reps, max_seconds) -> None:
    """bf16 vs FP8 (TE, torchao) for every Linear shape of the training step, in both roles (frozen teacher
    forward; differentiated student/DINOv2): writes the per-shape table the --fp8 rule reads (GPU, sm_90+)."""
    if (problem := file_problem(json_path, "--json")) is not None:
        raise click.ClickException(problem)
    from prodistill.accel.fp8 import BACKENDS
    from prodistill.bench.fp8 import format_fp8_table, run_fp8_bench, write_fp8_json
    from prodistill.config import build_config

    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise click.ClickException(f"--backends: unknown {', '.join(unknown) or '(none given)'}; "
                                   "choose from te, torchao")
    if not torch_cuda_sm90():
        raise click.ClickException("bench fp8 needs an NVIDIA Hopper-class GPU (compute capability 9.0+, e.g. "
                                   "H100/H200): FP8 timings mean nothing elsewhere; run it there")
    try:
        w, h = build_config({"preset": preset, "resolution": resolution, "frames": frames}).size()
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    import torch

    table = run_fp8_bench(preset, w, h, frames, batch_size, names, torch.device("cuda"), reps, max_seconds,
                          echo=click.echo)
    click.echo(format_fp8_table(table))
    click.echo(f"table: {write_fp8_json(table, Path(json_path))} (use it with --fp8-table, or copy it to "
               "prodistill/accel/fp8_table.json to ship it)")


def torch_cuda_sm90() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@bench.command("sample")
@click.option("--preset", type=click.Choice(["tiny", "svd-xt"]), default="svd-xt", show_default=True,
              help="Architecture (random weights) unless --teacher is given.")
@click.option("--teacher", default=None, help="Diffusers SVD folder or hub id to time instead of random weights.")
@click.option("--resolution", default="1024x576", show_default=True, help="WxH of the generation.")
@click.option("--frames", type=click.IntRange(2), default=14, show_default=True)
@click.option("--teacher-steps", type=click.IntRange(1), default=25, show_default=True,
              help="Euler steps of the teacher's CFG generation (SVD's default is 25).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--paths", default="eager,compile,ort,trt", show_default=True,
              help="Comma-separated inference paths to time (eager, compile, ort, trt); eager always runs (the "
                   "teacher's generation is the baseline); a path that cannot run here is listed as skipped.")
@click.option("--tiny-decoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A `prodistill train-decoder` folder for the tiny-decoder rows (default: a random-init tiny decoder "
                   "of the default widths: its time is the same, its frames are not meant to be looked at).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-sample.json", show_default=True)
def sample_command(preset, teacher, resolution, frames, teacher_steps, device, paths, tiny_decoder, json_path) -> None:
    """Teacher 25-step CFG vs student 1 step and TTS: torch eager, torch.compile, ONNX Runtime, TensorRT;
    encode / UNet / decode timed separately, peak memory (fp16 on GPU, fp32 on CPU)."""
    from prodistill.bench.sample import format_sample_table, parse_sample_paths, run_sample_bench, write_sample_json
    from prodistill.config import build_config
    from prodistill.training.run import resolve_device

    if (problem := file_problem(json_path, "--json")) is not None:
        raise click.ClickException(problem)
    try:
        dev = resolve_device(device)
        cfg = build_config({"preset": preset, "teacher": teacher, "resolution": resolution, "frames": frames,
                            "device": dev.type, "dtype": "fp16" if dev.type == "cuda" else "fp32"})
        result = run_sample_bench(cfg, dev, teacher_steps, paths=parse_sample_paths(paths), echo=click.echo,
                                  tiny_decoder=tiny_decoder)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_sample_table(result))
    click.echo(f"results: {write_sample_json(result, Path(json_path))}")


@bench.command("serve")
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `prodistill export`.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime's device.")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Comma-separated client thread counts.")
@click.option("--requests", type=click.IntRange(1), default=32, show_default=True, help="Requests per level.")
@click.option("--tts/--no-tts", default=False, show_default=True, help="Time Travel Sampler requests.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench-serve.json", show_default=True)
def serve_command(engines, backend, device, concurrency, requests, tts, json_path) -> None:
    """`prodistill serve` under load: requests/s and p50/p95/p99 latency per client concurrency, one local server."""
    if (problem := file_problem(json_path, "--json")) is not None:
        raise click.ClickException(problem)
    from prodistill.bench.serve import format_serve_table, run_serve_bench, write_serve_json

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        raise click.ClickException(f"--concurrency must be positive integers such as 1,4,16, got {concurrency!r}"
                                   ) from None
    try:
        result = run_serve_bench(engines, backend, device, levels, requests, tts, echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_serve_table(result))
    click.echo(f"results: {write_serve_json(result, Path(json_path))}")


__all__ = ["bench"]
