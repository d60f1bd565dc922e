"""The `prodistill` command line. Train flags are generated from `TrainConfig`, so a flag, its YAML key and
its `--help` text can never disagree."""

from __future__ import annotations

import logging
import math
import os
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import click

from prodistill.atomic import file_problem
from prodistill.bench import bench
from prodistill.config import TrainConfig, build_config


def _click_type(f) -> tuple[typing.Any, bool]:
    """(click type, is_flag) for a dataclass field."""
    tp = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) else [tp]
    base = args[0]
    if base is bool:
        return bool, True
    if "choices" in f.metadata:
        return click.Choice(f.metadata["choices"]), False
    return {int: int, float: float, str: str}[base], False


def _finite(ctx, param, value: float) -> float:
    """Click callback: nan or inf as a guidance scale makes black videos or fails after the work, so it is refused."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number; give a scale such as 3")
    return value


def train_options(func):
    """Add one option per TrainConfig field (default None = "not given", so YAML and presets apply)."""
    from prodistill.config import METHOD_DEFAULTS
    from prodistill.models.presets import PRESETS

    overrides = [(f"--method {m}", d) for m, d in METHOD_DEFAULTS.items()]  # applied in this order (`resolve`)
    overrides += [(f"--preset {p.name}", p.train_defaults) for p in PRESETS.values()]
    for f in reversed(fields(TrainConfig)):
        ctype, is_flag = _click_type(f)
        name = f"--{f.name.replace('_', '-')}"
        default = f.default if f.default is not MISSING else None
        other = "".join(f"; with {where}: {d[f.name]}" for where, d in overrides if f.name in d)
        help_text = f"{f.metadata['help']} [default: {default}{other}]"
        if is_flag:
            func = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)(func)
        else:
            func = click.option(name, f.name, type=ctype, default=None, help=help_text)(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """prodistill: distil Stable Video Diffusion into a 1-4 step student (OSV; LCM as the baseline)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


@main.command()
@click.option("--config", "config_file", default=None,
              help="YAML file of options (keys as the flags without dashes), or a shipped recipe's name (osv, mcm, "
                   "avdm2, osv-tiny, ...: configs/); flags override it.")
@train_options
def train(config_file: str | None, **flags) -> None:
    """Distil the teacher into a few-step student (default: OSV, both stages, tiny preset, built-in clips)."""
    _train(config_file, flags)


@main.command("train-decoder")
@click.option("--config", "config_file", default=None,
              help="YAML file of options (keys as the flags without dashes), or a shipped recipe's name (osv, mcm, "
                   "avdm2, osv-tiny, ...: configs/); flags override it.")
@train_options
def train_decoder(config_file: str | None, **flags) -> None:
    """Distil a tiny temporal VAE decoder from the teacher's full one (`train --method decoder`; widths with
    --decoder-channels); writes RUN/decoder for `export --decoder tiny --tiny-decoder` and `eval-decoder`."""
    if flags.get("method") not in (None, "decoder"):
        raise click.ClickException("train-decoder trains the decoder only: leave --method out (or use `train`)")
    flags["method"] = "decoder"
    flags["out"] = flags.get("out") or "runs/decoder"
    run_dir = _train(config_file, flags)
    if run_dir is not None and os.environ.get("RANK", "0") == "0":
        from prodistill.methods.decoder import save_decoder_folder

        click.echo(f"tiny decoder: {save_decoder_folder(run_dir)}")


def _train(config_file: str | None, flags: dict) -> Path | None:
    from prodistill.training.run import run_training
    from prodistill.training.trainer import TrainingInterrupted

    try:
        if flags.get("resume") and config_file is not None:
            raise ValueError("--resume continues a run with its own config (RUN/config.yaml): leave --config out "
                             "(single flags such as --stage still apply)")
        if flags.get("resume"):
            out = Path(flags.get("out") or TrainConfig.__dataclass_fields__["out"].default)
            if (out / "config.yaml").is_file():
                config_file = str(out / "config.yaml")
        cfg = build_config(flags, config_file)
        run_dir = run_training(cfg)
    except ValueError as e:  # every user-facing error in prodistill is a ValueError subclass
        raise click.ClickException(str(e)) from e
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        raise SystemExit(130) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job, not one per rank
        click.echo(f"done: {run_dir}")
    return run_dir


@main.group()
def data() -> None:
    """Data tools: precompute the latent cache."""


@data.command("cache")
@click.option("--data", "data_arg", default=None, help="Folder of videos or a .csv/.jsonl manifest (default: built-in clips).")
@click.option("--video-root", default=None, help="Folder that relative manifest paths are relative to.")
@click.option("--out", required=True, help="Cache folder to create (or resume).")
@click.option("--teacher", default=None, help="Diffusers SVD folder or hub id whose VAE and CLIP encode (default: --preset, random).")
@click.option("--preset", type=click.Choice(["tiny", "svd-xt"]), default="tiny", show_default=True)
@click.option("--resolution", default=None, help="WxH in pixels (default: the preset's).")
@click.option("--frames", type=int, default=14, show_default=True)
@click.option("--fps", type=float, default=7.0, show_default=True)
@click.option("--noise-aug-strength", type=float, default=0.02, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the clip choice and augmentation noise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=64, show_default=True, help="Videos per shard file.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Clips per encoder batch.")
def data_cache(data_arg, video_root, out, shard_size, batch_size, **model_flags) -> None:
    """Encode every clip once (VAE latents, CLIP embedding, conditioning latent) for `train --data CACHE`."""
    from prodistill.atomic import folder_problem
    from prodistill.data.cache import build_cache
    from prodistill.data.dataset import list_videos
    from prodistill.training.run import build_models, resolve_device

    if (problem := folder_problem(out, "--out", out)) is not None:
        raise click.ClickException(problem)
    try:
        cfg = build_config({**model_flags, "data": data_arg, "video_root": video_root})
        videos = list_videos(cfg.data, cfg.video_root)
        models = build_models(cfg, resolve_device(cfg.device))
        path, skipped = build_cache(cfg, models, videos, Path(out), shard_size, batch_size)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    if skipped:
        click.echo(f"cached {len(videos) - len(skipped)} of {len(videos)} videos in {path}; {len(skipped)} could not "
                   f"be decoded (listed under \"skipped\" in {path / 'cache.json'})")
    else:
        click.echo(f"cached {len(videos)} videos in {path}")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder of `prodistill train` (its last stage's latest checkpoint is used) or a checkpoint folder.")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="Conditioning image.")
@click.option("--out", "out_path", default="sample.mp4", show_default=True, help="Output mp4 (H.264).")
@click.option("--steps", type=click.IntRange(1, 4), default=None,
              help="Student steps [default: the run's --student-steps for AVDM2, else 1].")
@click.option("--tts/--no-tts", default=False, show_default=True, help="Time Travel Sampler (OSV eq. 13; NFE 2 per step).")
@click.option("--teacher-steps", type=click.IntRange(1, 1000), default=None,
              help="Sample the teacher instead (EDM Euler with per-frame CFG), with this many steps.")
@click.option("--cfg", "cfg_scale", type=float, default=3.0, show_default=True, callback=_finite,
              help="Teacher CFG: the last frame's scale (the first frame's is 1, linear in between, as SVD).")
@click.option("--weights", type=click.Choice(["student", "ema"]), default="student", show_default=True,
              help="Which stage-2 weights to sample from.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def sample(ckpt, image, out_path, steps, tts, teacher_steps, cfg_scale, weights, seed, device) -> None:
    """Generate a video from one image with the distilled student (or the teacher, for comparison)."""
    from prodistill.sampling import generate_video

    if (problem := file_problem(out_path, "--out", ".mp4")) is not None:
        raise click.ClickException(problem)
    try:
        path = generate_video(Path(ckpt), Path(image), Path(out_path), steps=steps, tts=tts,
                              teacher_steps=teacher_steps, cfg_scale=cfg_scale, weights=weights, seed=seed,
                              device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path}")


@main.command("eval")
@click.option("--ckpt", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder of `prodistill train` (its last stage's latest checkpoint) or a checkpoint folder.")
@click.option("--data", required=True, help="Held-out videos: a folder or a .csv/.jsonl manifest (as for train); "
                                            "each clip's first frame conditions the generations.")
@click.option("--video-root", default=None, help="Folder that relative paths in a --data manifest are relative to.")
@click.option("--num-videos", type=click.IntRange(2), default=16, show_default=True,
              help="Clips to evaluate (the papers report FVD on 1,000; a few dozen show trends only).")
@click.option("--steps", type=click.IntRange(1, 4), default=None,
              help="Student steps [default: the run's --student-steps for AVDM2, else 1].")
@click.option("--tts/--no-tts", default=False, show_default=True, help="Student with the Time Travel Sampler.")
@click.option("--teacher-steps", type=click.IntRange(0, 1000), default=25, show_default=True,
              help="The teacher's Euler steps on the same clips and noise (0: no teacher row).")
@click.option("--cfg", "cfg_scale", type=float, default=3.0, show_default=True, callback=_finite,
              help="Teacher CFG (last frame's).")
@click.option("--weights", type=click.Choice(["student", "ema"]), default="student", show_default=True)
@click.option("--i3d", default=None, help="I3D TorchScript file for FVD (i3d_torchscript.pt); nothing is downloaded. "
                                          "Without it a random-init stand-in runs (FVD comparable only between runs).")
@click.option("--clip", default=None, help="transformers CLIPVisionModelWithProjection folder [default: the "
                                           "teacher's own image encoder].")
@click.option("--real-stats", default=None, help="File of the real clips' feature statistics: read when it exists "
                                                 "(and was made with the same settings), else written.")
@click.option("--out", default="eval", show_default=True, help="Folder for eval.json and grid.mp4 (real | teacher | student).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def eval_command(ckpt, data, video_root, num_videos, steps, tts, teacher_steps, cfg_scale, weights, i3d, clip,
                 real_stats, out, seed, device) -> None:
    """Score the student (and the teacher) on held-out videos: FVD, CLIP similarity to the conditioning image,
    temporal consistency; a JSON, a table and a side-by-side mp4."""
    from prodistill.eval.run import EvalOptions, evaluate, format_eval_table

    opts = EvalOptions(Path(ckpt), data, Path(out), video_root, num_videos, steps, tts, teacher_steps, cfg_scale,
                       weights, i3d, clip, real_stats, seed, device)
    try:
        result = evaluate(opts, echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_eval_table(result))
    click.echo(f"wrote {Path(out) / 'eval.json'}" + (f" and {result['grid']}" if "grid" in result else ""))


@main.command("eval-decoder")
@click.option("--decoder", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder `prodistill train-decoder` wrote (RUN/decoder) or its run folder.")
@click.option("--data", required=True, help="Held-out videos (folder or manifest).")
@click.option("--num-videos", type=click.IntRange(1), default=8, show_default=True)
@click.option("--time-resolution", default=None, help="WxH at which both decoders are timed (default: the run's; "
                                                      "1024x576 for SVD-XT's serving size).")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed decodes each (median).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval-decoder"), show_default=True)
def eval_decoder_command(decoder, data, num_videos, time_resolution, repeats, seed, device, out) -> None:
    """The tiny decoder against the full one: PSNR, SSIM, flicker, decode time and memory of both."""
    from prodistill.eval.decoder import DecoderEvalOptions, evaluate_decoder, format_decoder_table

    try:
        result = evaluate_decoder(DecoderEvalOptions(decoder, data, num_videos, time_resolution, repeats, seed, device,
                                                     out), echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_decoder_table(result))
    click.echo(f"wrote {out / 'eval-decoder.json'}")


main.add_command(bench)


# -- export and torch-free generation (issue 9) --------------------------------------------------------------
@main.command("export")
@click.option("--ckpt", required=True, type=click.Path(file_okay=False),
              help="Run folder of `prodistill train` (its last stage's latest checkpoint) or a checkpoint folder.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Engines folder: ONNX graphs, TensorRT engines and manifest.json.")
@click.option("--onnx/--no-onnx", "onnx_flag", default=None,
              help="Write the ONNX graphs and check them with ONNX Runtime [default: on unless only --diffusers].")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs TensorRT: the Docker image has it).")
@click.option("--diffusers", default=None, type=click.Path(file_okay=False),
              help="Also write the merged student as a diffusers StableVideoDiffusionPipeline folder here.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="Compute precision inside the graphs (their inputs and outputs are float32).")
@click.option("--resolution", default=None, help="WxH of the exported graphs (default: the run's).")
@click.option("--frames", type=click.IntRange(2), default=None, help="Frames of the exported graphs (default: the run's).")
@click.option("--weights", type=click.Choice(["student", "ema"]), default="student", show_default=True)
@click.option("--decoder", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="full: the VAE temporal decoder; tiny: the decoder of `prodistill train-decoder` (--tiny-decoder).")
@click.option("--tiny-decoder", type=click.Path(path_type=Path), default=None,
              help="The folder `prodistill train-decoder` wrote (RUN/decoder), for --decoder tiny.")
@click.option("--opset", type=click.Choice(["18", "19", "20"]), default="19", show_default=True)
@click.option("--workspace-gib", type=float, default=8.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the models are built and traced.")
def export_command(ckpt, out, onnx_flag, trt, diffusers, opset, **kw) -> None:
    """Merge the student and export it for 1-step serving (ONNX, TensorRT, diffusers)."""
    from export.run import ExportOptions, run_export
    from export.runtime.backends import BackendError

    onnx_flag = onnx_flag if onnx_flag is not None else (trt or diffusers is None)
    opts = ExportOptions(ckpt=Path(ckpt), out=Path(out) if out else None, onnx=onnx_flag, trt=trt,
                         diffusers=Path(diffusers) if diffusers else None, opset=int(opset), **kw)
    try:
        run_export(opts, echo=click.echo)
    except (ValueError, BackendError) as e:  # ExportError, config errors, a missing TensorRT: one sentence each
        raise click.ClickException(str(e)) from e


from export.runtime.cli import generate  # noqa: E402  (torch-free; `prodistill.entry` runs it without this module)
from export.serve.cli import serve  # noqa: E402  (likewise)

main.add_command(generate)
main.add_command(serve)

if __name__ == "__main__":
    main()
