"""Generation with a distilled student or with the teacher, from one conditioning image.

Shared by `prodistill sample` and the trainer's preview videos. The student runs without CFG (OSV §4):
the k-step consistency sampler, or the Time Travel Sampler (eq. 13, NFE 2 at one step). The teacher runs
SVD's own recipe: Euler on the PF-ODE over Karras σ with per-frame linear CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prodistill.diffusion.consistency import SONG, ConsistencyParam, Denoiser
from prodistill.diffusion.edm import karras_sigmas, sampler_indices, training_grid
from prodistill.diffusion.samplers import consistency_sample, time_travel_sample
from prodistill.diffusion.solvers import bind, edm_euler_sample, frame_guidance, guided_denoiser
from prodistill.models.svd import SVDCondition, SVDModels


def student_sigmas(steps: int, num_timesteps: int) -> tuple[Tensor, Tensor]:
    """(σ of the `steps`-step schedule, σ of the (steps+1)-step schedule that TTS travels through), float32
    as the samplers use them; the export writes the same values into its manifest."""
    grid = training_grid(num_timesteps).to(torch.float32)
    return grid[sampler_indices(steps, num_timesteps)], grid[sampler_indices(steps + 1, num_timesteps)]


@torch.no_grad()
def sample_student(denoise: Denoiser, shape: tuple[int, ...], steps: int, tts: bool, num_timesteps: int,
                   generator: torch.Generator | None, device: torch.device, noise: Tensor | None = None,
                   consistency: bool = True, param: ConsistencyParam = SONG) -> Tensor:
    """Latents from a consistency student in `steps` steps (TTS: 2·steps network calls). `noise` (shape
    `shape`) replaces the initial draw, so a runtime without torch's RNG can be compared on the same ε.
    consistency=False: a few-step generator whose denoiser output is its clean estimate (`Method.consistency`)."""
    if tts and not consistency:
        raise ValueError("--tts is the Time Travel Sampler of consistency students (OSV eq. 13); this student is a "
                         "few-step generator: sample it without --tts")
    sigmas, sigmas_next = (s.to(device) for s in student_sigmas(steps, num_timesteps))
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    if tts:
        return time_travel_sample(denoise, noise.to(device), sigmas, sigmas_next, param)
    return consistency_sample(denoise, noise.to(device), sigmas, generator, consistency=consistency, param=param)


@torch.no_grad()
def sample_teacher(models: SVDModels, cond: SVDCondition, shape: tuple[int, ...], steps: int,
                   cfg_min: float, cfg_max: float, generator: torch.Generator | None) -> Tensor:
    """Latents from the teacher: `steps` Euler steps with per-frame CFG from cfg_min to cfg_max."""
    noise = torch.randn(shape, generator=generator, device=models.device)
    guidance = frame_guidance(cfg_min, cfg_max, shape[0], shape[1], models.device)
    denoise = guided_denoiser(models.denoiser(models.teacher), cond, cond.unconditional(), guidance)
    return edm_euler_sample(denoise, noise, karras_sigmas(steps).to(models.device))


def load_image(path: str | Path, width: int, height: int) -> Tensor:
    """An image file → (1, 3, H, W) in [−1, 1], resized to cover (W, H) and centre-cropped."""
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's guard against images that would fill the memory
        raise ValueError(f"the image {path} is too large (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels): resize it, to "
                         f"the video's {width}x{height} or a few times that") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read image {path}: pass a PNG or JPEG file ({e})") from e
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
    from prodistill.data.dataset import cover_crop

    return cover_crop(x, width, height) / 127.5 - 1.0


def to_uint8_frames(pixels_fchw: Tensor) -> np.ndarray:
    """(F, 3, H, W) in [−1, 1] → (F, H, W, 3) uint8 for a video writer."""
    x = ((pixels_fchw.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from either a run folder or one of its checkpoint folders."""
    from prodistill.training.checkpoint import META_FILE, latest_checkpoint

    if (path / META_FILE).is_file():
        return path.parent.parent, path
    for stage in (2, 1):
        ckpt = latest_checkpoint(path / f"stage{stage}")
        if ckpt is not None:
            return path, ckpt
    raise ValueError(f"{path} holds no checkpoint: pass the --out folder of a `prodistill train` run")


def checkpoint_size(cfg, ckpt_dir: Path) -> tuple[int, int]:
    """(W, H) the checkpoint's student last trained at (its stage and step against the run's --stage1-resolution and
    --resolution-schedule): what `sample`, `eval` and `export` use unless told otherwise."""
    from prodistill.training.checkpoint import read_meta

    meta = read_meta(ckpt_dir)
    stage = int(meta.get("stage", 2 if (ckpt_dir / "ema.safetensors").is_file() else 1))
    step = int(meta.get("step", cfg.steps_for(stage)))
    return cfg.size_at(stage, max(step - 1, 0))


def checkpoint_stage(ckpt_dir: Path, tensors: dict | None = None) -> int:
    """The stage whose student a checkpoint holds (its meta; older checkpoints: stage 2 where EMA exists, in
    `tensors` or else on disk)."""
    from prodistill.training.checkpoint import read_meta

    has_ema = "ema" in tensors if tensors is not None else (ckpt_dir / "ema.safetensors").is_file()
    return int(read_meta(ckpt_dir).get("stage", 2 if has_ema else 1))


def weights_file(ckpt_dir: Path, weights: str) -> Path:
    """The checkpoint's file of `weights` (student, ema), its header read (cheap: a truncated file fails here,
    before any model is built); a missing or damaged file is one sentence naming it."""
    from safetensors import SafetensorError, safe_open

    path = ckpt_dir / f"{weights}.safetensors"
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} has no {weights} weights (EMA exists in stage 2 only): use --weights student")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (OSError, SafetensorError) as e:
        raise ValueError(f"the checkpoint file {path} is damaged ({str(e)[:200]}): rerun the training that wrote it, "
                         "or pass another checkpoint as --ckpt") from e
    return path


@dataclass
class LoadedRun:
    """A trained run ready to sample: its config, models, method class, the student (eval mode) or None
    without a checkpoint, and its default number of student steps."""

    cfg: object
    models: SVDModels
    method: type
    student: torch.nn.Module | None
    steps: int


def run_config(ckpt: Path, device: str = "auto", weights: str = "student", student: bool = True):
    """(config at the checkpoint's size, checkpoint folder) of the run behind `ckpt`: every check of `load_run` that
    needs no model, so that `sample` and `eval` refuse a wrong checkpoint before they build one."""
    from prodistill.config import build_config

    run_dir, ckpt_dir = _resolve_checkpoint(ckpt)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} has no config.yaml: pass the --out folder of a `prodistill train` run")
    cfg = build_config({"device": device}, run_dir / "config.yaml")
    cfg = cfg.at_resolution(checkpoint_size(cfg, ckpt_dir))
    if cfg.method == "decoder":
        raise ValueError(f"{run_dir} trained a tiny decoder, not a student: use it with `prodistill eval-decoder` "
                         "or `prodistill export --decoder tiny --tiny-decoder`")
    if student:
        weights_file(ckpt_dir, weights)
    return cfg, ckpt_dir


def load_run(ckpt: Path, device: str = "auto", weights: str = "student", student: bool = True) -> LoadedRun:
    """The run behind `ckpt` (a run folder or one of its checkpoint folders), with its `weights` (student or
    EMA) loaded into a fresh student; student=False builds only the models (sampling the teacher). Teacher and
    student run with the exact rewrite of training (`prodistill.accel.rewrites`: the same function, less work)."""
    from safetensors.torch import load_file

    from prodistill.accel.rewrites import apply_rewrites
    from prodistill.methods import method_class
    from prodistill.models.student import load_trainable
    from prodistill.training.run import build_models, resolve_device

    cfg, ckpt_dir = run_config(ckpt, device, weights, student)
    method = method_class(cfg.method)
    models = build_models(cfg, resolve_device(cfg.device))
    net = None
    if student:
        net = models.make_student(cfg, stage=checkpoint_stage(ckpt_dir))
        load_trainable(net, load_file(str(weights_file(ckpt_dir, weights)), device=str(models.device)))
        net.eval()
    apply_rewrites([models.unet] + ([net] if net is not None else []))
    return LoadedRun(cfg, models, method, net, method.default_sample_steps(cfg))


def generate_video(ckpt: Path, image: Path, out: Path, steps: int | None = None, tts: bool = False,
                   teacher_steps: int | None = None, cfg_scale: float = 3.0, weights: str = "student",
                   seed: int = 0, device: str = "auto") -> Path:
    """`prodistill sample`: one video from one image, with the run's student (or its teacher). `steps`
    defaults to the method's choice (AVDM2: the run's `--student-steps`, which its generator is trained for; 1
    otherwise)."""
    from prodistill.data.video import write_mp4

    cfg, _ = run_config(ckpt, device, weights, student=teacher_steps is None)
    width, height = cfg.size()
    cond_image = load_image(image, width, height)  # a bad image is refused before the models are built
    run = load_run(ckpt, device, weights, student=teacher_steps is None)
    models = run.models
    generator = torch.Generator(models.device).manual_seed(seed)
    cond = models.condition(cond_image, cfg.frames, cfg.fps, generator)
    shape = models.latent_shape(1, cfg.frames, width, height)
    if teacher_steps is not None:
        latents = sample_teacher(models, cond, shape, teacher_steps, 1.0, cfg_scale, generator)
    else:
        denoise = bind(models.denoiser(run.student), cond)
        latents = sample_student(denoise, shape, steps or run.steps, tts, cfg.num_timesteps, generator,
                                 models.device, consistency=run.method.consistency,
                                 param=ConsistencyParam.from_config(cfg))
    pixels = models.decode(latents)
    return write_mp4(out, to_uint8_frames(pixels[0]), cfg.fps)
