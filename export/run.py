"""`prodistill export`: check everything cheap, merge the checkpoint's student, then write what was asked.

Order: the checkpoint, the flags, the output folders and the optional packages are checked before any model is
built (each failure is one sentence); then the models are rebuilt in float32 as the run built them, the student's
LoRA and trained modules are loaded and merged into a copy (never into the teacher), and the ONNX graphs (checked
against PyTorch with ONNX Runtime), the TensorRT engines and the diffusers folder are written. Each folder is
built beside its target and swapped in when complete, so an export that fails or is interrupted leaves the
previous one as it was, never a mix of both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator

import torch

from export.onnx_export import OPSET, ExportError, export_all, import_onnx
from export.runtime.manifest import MANIFEST, Manifest
from export.runtime.tensorrt import TIMING_CACHE
from prodistill.atomic import folder_problem, umask_mode

DECODERS = ("full", "tiny")
ENGINE_FILES = (MANIFEST, "*.onnx", "*.onnx.data", "*.plan", TIMING_CACHE)
DIFFUSERS_FILES = ("model_index.json", "feature_extractor", "image_encoder", "scheduler", "unet", "vae")
"""What an export writes into --out and --diffusers: an existing folder holding anything else is refused, since
an export replaces its folder whole (`replaced_whole`)."""
PARTIAL = ".partial-"


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
    from prodistill import sampling
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
    if opts.onnx or opts.trt:
        check_out(opts.out, "--out", ENGINE_FILES)
    if opts.diffusers:
        check_out(opts.diffusers, "--diffusers", DIFFUSERS_FILES)
        if (opts.onnx or opts.trt) and _nested(opts.out, opts.diffusers):
            raise ExportError("--out and --diffusers must be separate folders, neither inside the other: an export "
                              "replaces each whole")
    run_dir, ckpt_dir = _resolve_checkpoint(opts.ckpt)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} has no config.yaml: pass the --out folder of a `prodistill train` run")
    try:
        sampling.weights_file(ckpt_dir, opts.weights)  # missing or damaged: one sentence before any model is built
    except ValueError as e:
        raise ExportError(str(e)) from None
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


def check_out(path: Path, flag: str, owned: tuple[str, ...]) -> None:
    """The export is built beside `path` and swapped in (`replaced_whole`), so `path`'s parent must be writable
    too (unless `path` is a mount point, built in), and an existing `path` may hold only what the export writes
    (anything else would be lost)."""
    full = Path(path).expanduser().resolve()
    problem = folder_problem(full, flag, path) or (None if os.path.ismount(full) else
                                                   folder_problem(full.parent, flag, path))
    if problem:
        raise ExportError(problem)
    owned = (*owned, f".{full.name}{PARTIAL}*")  # what an export killed outright left (in a mount point)
    names = [p.name for p in full.iterdir()] if full.is_dir() else []
    foreign = sorted(n for n in names if not any(fnmatch(n, pattern) for pattern in owned))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ExportError(f"{flag} {path} holds {foreign[0]}{more}, which an export does not write, and an export "
                          f"replaces its folder whole: choose a new or empty {flag}")


def _nested(a: Path, b: Path) -> bool:
    a, b = (Path(p).expanduser().resolve() for p in (a, b))
    return a == b or a in b.parents or b in a.parents


@contextlib.contextmanager
def replaced_whole(out: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """A new folder beside `out` to build in, which replaces `out` whole once the block completes: until then
    `out` stays as it was, and afterwards nothing of the old folder is left in it but the files in `keep` (copied
    first). A failed or interrupted build is removed; one killed outright is removed by the next export to `out`.

    A mount point (a Docker volume, as README's `docker run ... export` uses) cannot be renamed, and the folder
    beside it may be on another file system: there the build is inside `out`, and its entries replace the old
    ones with the top-level JSON (manifest.json, model_index.json) last, so that no reader sees a mix of both."""
    out = Path(out).expanduser().resolve()
    mounted = os.path.ismount(out)
    home = out if mounted else out.parent
    home.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{PARTIAL}"
    for stale in home.iterdir():
        if stale.name.startswith(prefix):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=prefix))
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp's folders are private
        for name in keep:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        yield tmp
        old = tmp.with_name(f"{tmp.name}-old")
        if mounted:
            old.mkdir()
            for entry in [e for e in out.iterdir() if not e.name.startswith(prefix)]:
                os.rename(entry, old / entry.name)
            for entry in sorted(tmp.iterdir(), key=lambda e: e.suffix == ".json"):
                os.rename(entry, out / entry.name)
        else:
            if out.exists():
                os.rename(out, old)
            os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

        with replaced_whole(opts.diffusers) as folder:
            write_diffusers_folder(models, unet, folder)
        echo(f"wrote diffusers folder {opts.diffusers}")
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
    with replaced_whole(opts.out, keep=(TIMING_CACHE,)) as folder:  # the TensorRT timing cache outlives engines
        manifest = export_graphs(models, unet, cfg, folder, opts.precision, opts.opset, source, echo, tiny)
        if opts.trt:
            build_engines(manifest, folder, opts.workspace_gib, echo)
    echo(f"wrote {Path(opts.out) / MANIFEST} ({time.perf_counter() - start:.1f} s in all)")
    return manifest
