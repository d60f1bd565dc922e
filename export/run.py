"""`prodistill export`: check everything cheap, merge the checkpoint's student, then write what was asked.

Order: the checkpoint, the flags and the optional packages are checked before any model is built (each
failure is one sentence); then the models are rebuilt in float32 as the run built them, the student's LoRA
and trained modules are loaded and merged into a copy (never into the teacher), and the ONNX graphs (checked
against PyTorch with ONNX Runtime), the TensorRT engines and the diffusers folder are written.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from export.onnx_export import OPSET, ExportError, export_all, import_onnx
from export.runtime.manifest import Manifest

DECODERS = ("full", "tiny")


@dataclass(kw_only=True)
class ExportOptions:
    ckpt: Path
    """Run folder of `prodistill train` or one of its checkpoint folders."""
    out: Path | None = None
    """Engines folder (ONNX graphs, engines, manifest.json)."""
    onnx: bool = True
    trt: bool = False
    diffusers: Path | None = None
    """Also (or only, without --onnx/--trt) write a diffusers folder here."""
    precision: str = "fp16"
    resolution: str | None = None
    """WxH; default: the run's."""
    frames: int | None = None
    """Frames of the exported graphs; default: the run's."""
    weights: str = "student"
    decoder: str = "full"
    tiny_decoder: Path | None = None
    """The folder `prodistill train-decoder` wrote (RUN/decoder), for --decoder tiny."""
    device: str = "auto"
    opset: int = OPSET
    workspace_gib: float = 8.0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_options(opts: ExportOptions):
    """(config, checkpoint folder): every check that needs no model, each failing with one sentence."""
    from prodistill.config import build_config
    from prodistill.sampling import _resolve_checkpoint, checkpoint_size

    if opts.decoder not in DECODERS:
        raise ExportError(f"--decoder must be one of {', '.join(DECODERS)}, got {opts.decoder!r}")
    if not opts.ckpt.is_dir():
        raise ExportError(f"--ckpt {opts.ckpt}: no such folder; pass the --out folder of a `prodistill train` run")
    if (opts.onnx or opts.trt) and opts.out is None:
        raise ExportError("--out is required for --onnx/--trt: the folder to write the graphs and manifest.json to")
    if not (opts.onnx or opts.trt or opts.diffusers):
        raise ExportError("nothing to export: pass --onnx, --trt and/or --diffusers DIR")
    run_dir, ckpt_dir = _resolve_checkpoint(opts.ckpt)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} has no config.yaml: pass the --out folder of a `prodistill train` run")
    weights_file = ckpt_dir / f"{opts.weights}.safetensors"
    if not weights_file.is_file():
        raise ExportError(f"{ckpt_dir} has no {opts.weights} weights (EMA exists in stage 2 only): use --weights student")
    overrides = {"device": opts.device, "dtype": "fp32", "resolution": opts.resolution, "frames": opts.frames}
    cfg = build_config(overrides, run_dir / "config.yaml")
    if opts.resolution is None:
        cfg = cfg.at_resolution(checkpoint_size(cfg, ckpt_dir))  # the one the checkpoint's student trained at
    if opts.decoder == "tiny":
        check_tiny_decoder(opts.tiny_decoder, cfg.frames)
    elif opts.tiny_decoder is not None:
        raise ExportError("--tiny-decoder is used with --decoder tiny: add --decoder tiny, or leave --tiny-decoder out")
    if opts.onnx or opts.trt:
        import_onnx()
    if opts.trt:
        from export.runtime.tensorrt import import_tensorrt

        import_tensorrt()
    if opts.precision == "bf16" and (opts.onnx or opts.trt):
        _, ort = import_onnx()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("--precision bf16 cannot be checked here: ONNX Runtime's CPU provider has no bf16 "
                              "kernels; use fp16 or fp32, or install onnxruntime-gpu on a GPU machine")
    return cfg, ckpt_dir


def check_tiny_decoder(folder: Path | None, frames: int) -> None:
    """--decoder tiny needs the folder of a tiny decoder built for the export's frames."""
    import json

    from prodistill.models.tiny_decoder import CONFIG_FILE

    if folder is None or not (Path(folder) / CONFIG_FILE).is_file():
        raise ExportError(f"--decoder tiny needs --tiny-decoder DIR, the decoder folder `prodistill train-decoder` "
                          f"writes (RUN/decoder){'' if folder is None else f'; {folder} holds no {CONFIG_FILE}'}")
    built = json.loads((Path(folder) / CONFIG_FILE).read_text())["frames"]
    if built != frames:
        raise ExportError(f"the tiny decoder in {folder} was trained for {built} frames, the export has {frames}: "
                          f"export with --frames {built}, or train a decoder with --frames {frames}")


def merged_student(cfg, models, ckpt_dir: Path, weights: str) -> torch.nn.Module:
    """The checkpoint's student (LoRA + trained modules) merged into a standalone UNet copy."""
    from export.graphs import merge_student
    from prodistill.models.student import load_trainable
    from prodistill.sampling import checkpoint_stage
    from prodistill.training.checkpoint import load_weights

    tensors = load_weights(ckpt_dir, models.device)
    student = models.make_student(cfg, stage=checkpoint_stage(ckpt_dir, tensors))
    load_trainable(student, tensors[weights])
    return merge_student(student)


def graph_shapes(models, cfg) -> dict[str, dict[str, tuple[int, ...]]]:
    """Static input shapes of the four graphs at the config's resolution and frames (batch 1)."""
    width, height = cfg.size()
    latent_shape = tuple(models.latent_shape(1, cfg.frames, width, height))
    return {
        "image_encoder": {"pixel_values": (1, 3, models.clip_size, models.clip_size)},
        "vae_encoder": {"image": (1, 3, height, width)},
        "denoiser": {"x": latent_shape, "sigma": (1,),
                     "image_embeds": (1, 1, models.image_encoder.config.projection_dim),
                     "image_latents": latent_shape, "added_time_ids": (1, 3)},
        "decoder": {"latents": latent_shape},
    }


def generator_settings(cfg) -> dict:
    """The manifest's sampler fields: a method whose student is not a consistency model (AVDM2's few-step
    generator) is sampled over its --student-steps schedule, as `prodistill sample` does."""
    from prodistill.methods import method_class
    from prodistill.sampling import student_sigmas

    if method_class(cfg.method).consistency:
        return {"sampler": "consistency", "sigmas_generator": []}
    sigmas, _ = student_sigmas(cfg.student_steps, cfg.num_timesteps)
    return {"sampler": "generator", "sigmas_generator": [float(s) for s in sigmas]}


def export_graphs(models, unet: torch.nn.Module, cfg, folder: Path, precision: str, opset: int = OPSET,
                  source: dict | None = None, echo: Callable[[str], None] = print,
                  tiny_decoder: torch.nn.Module | None = None) -> Manifest:
    """Export the four graphs of `models` with the student UNet `unet` (cast in place) at the config's resolution
    and frames, check them, and write `folder/manifest.json`. Shared by `prodistill export` and the bench."""
    from export.graphs import build_graphs
    from prodistill.diffusion.edm import SIGMA_MIN
    from prodistill.sampling import student_sigmas

    folder.mkdir(parents=True, exist_ok=True)
    width, height = cfg.size()
    latent_shape = list(models.latent_shape(1, cfg.frames, width, height))
    sigmas, sigmas_next = student_sigmas(1, cfg.num_timesteps)
    time_ids = [cfg.fps - 1, float(cfg.motion_bucket_id), cfg.noise_aug_strength]
    shapes = graph_shapes(models, cfg)
    graphs = build_graphs(models, unet, precision, tiny_decoder)
    infos = export_all(graphs, shapes, folder, precision, time_ids, float(sigmas[0]), opset, echo)
    manifest = Manifest(
        width=width, height=height, frames=cfg.frames, fps=cfg.fps, motion_bucket_id=cfg.motion_bucket_id,
        noise_aug_strength=cfg.noise_aug_strength, latent_shape=latent_shape, scaling_factor=models.scaling_factor,
        clip_size=models.clip_size, clip_mean=models.clip_mean.flatten().tolist(),
        clip_std=models.clip_std.flatten().tolist(), sigma_min=SIGMA_MIN, sigmas_1step=[float(s) for s in sigmas],
        cm_sigma_data=float(cfg.cm_sigma_data), cm_scale=float(cfg.cm_scale),
        sigmas_tts=[float(sigmas[0]), float(sigmas_next[1])], num_timesteps=cfg.num_timesteps, precision=precision,
        opset=opset, graphs=infos, source=source or {}, **generator_settings(cfg),
    )
    manifest.save(folder)
    return manifest


def build_engines(manifest: Manifest, folder: Path, workspace_gib: float = 8.0,
                  echo: Callable[[str], None] = print) -> Manifest:
    """TensorRT engines for every graph of an export (sharing one timing cache); updates its manifest."""
    from export.runtime.tensorrt import TIMING_CACHE, build_engine

    for name, info in manifest.graphs.items():
        echo(f"building TensorRT engine for {name} (strongly typed, workspace {workspace_gib:g} GiB)...")
        info.engine = build_engine(folder / info.file, folder / f"{name}.plan", workspace_gib,
                                   folder / TIMING_CACHE).name
    manifest.save(folder)
    return manifest


def run_export(opts: ExportOptions, echo: Callable[[str], None] = print) -> Manifest | None:
    from prodistill.training.run import build_models, resolve_device

    cfg, ckpt_dir = _check_options(opts)
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    weights_file = ckpt_dir / f"{opts.weights}.safetensors"
    echo(f"building {cfg.preset} models on {device} and merging {weights_file}...")
    models = build_models(cfg, device)
    unet = merged_student(cfg, models, ckpt_dir, opts.weights)
    if opts.diffusers:
        from export.diffusers_folder import write_diffusers_folder

        echo(f"wrote diffusers folder {write_diffusers_folder(models, unet, Path(opts.diffusers))}")
    if not (opts.onnx or opts.trt):
        return None
    source = {"checkpoint": str(ckpt_dir.resolve()), "weights": opts.weights, "sha256": sha256(weights_file),
              "method": cfg.method, "preset": cfg.preset, "teacher": cfg.teacher, "lora_rank": cfg.lora_rank,
              "train_modules": cfg.train_modules, "decoder": opts.decoder}
    tiny = None
    if opts.decoder == "tiny":
        from prodistill.models.tiny_decoder import TinyTemporalDecoder

        tiny = TinyTemporalDecoder.load(opts.tiny_decoder, device)
        source["tiny_decoder"] = str(Path(opts.tiny_decoder).resolve())
    out = Path(opts.out)
    manifest = export_graphs(models, unet, cfg, out, opts.precision, opts.opset, source, echo, tiny)
    if opts.trt:
        build_engines(manifest, out, opts.workspace_gib, echo)
    echo(f"wrote {out / 'manifest.json'} ({time.perf_counter() - start:.1f} s in all)")
    return manifest
