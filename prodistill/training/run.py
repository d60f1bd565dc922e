"""`prodistill train`: validate everything cheap first, build the models once, then run the selected stages.

Run folder layout:
    RUN/config.yaml               resolved configuration (what `--resume` and `prodistill sample` read)
    RUN/metrics.jsonl             one line per logged step
    RUN/stage{1,2}/ckpt-NNNNNNN/  student.safetensors, discriminator.safetensors, ema.safetensors (stage 2),
                                  state.pt (optimisers, schedules, RNG, data position), meta.json
    RUN/samples/*.mp4             preview videos (1-step student)

Under torchrun every rank runs this same function (`prodistill.training.distributed`): all validate, build the
frozen models and the method; rank 0 alone writes the folder's files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import torch

from prodistill.config import TrainConfig, _flag
from prodistill.methods import build_method, method_class
from prodistill.models.student import check_targets
from prodistill.training import distributed
from prodistill.training.checkpoint import latest_checkpoint, load_weights, read_meta
from prodistill.training.logger import MetricsLogger
from prodistill.training.trainer import Trainer

log = logging.getLogger("prodistill")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(ValueError):
    """A run folder or device request that cannot work as asked."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or check the driver")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


STRUCTURE = ("method", "preset", "teacher", "dino", "image_teacher", "lora_rank", "lora_targets", "train_modules",
             "disc_input", "disc_upscale", "disc_head_channels", "motion_repr", "decoder_channels")
"""Config keys that decide the networks a checkpoint's weights fit: a resumed run may not change them."""


def check_run_dir(cfg: TrainConfig) -> Path:
    from prodistill.atomic import folder_problem

    run_dir = Path(cfg.out)
    if (problem := folder_problem(run_dir, "--out")) is not None:
        raise RunError(problem)
    has_ckpt = any(latest_checkpoint(run_dir / f"stage{s}") for s in (1, 2))
    has_config = (run_dir / "config.yaml").is_file()
    if cfg.resume and not has_config:
        if has_ckpt:
            raise RunError(f"--resume: {run_dir} holds checkpoints but no config.yaml, so its settings are unknown; "
                           "choose another --out (or remove the folder to start over)")
        raise RunError(f"--resume: {run_dir} holds no run (no config.yaml); start it without --resume")
    if has_ckpt and not cfg.resume:
        if not has_config:
            raise RunError(f"{run_dir} holds checkpoints but no config.yaml (not a run prodistill can resume); "
                           "choose another --out (or remove the folder to start over)")
        raise RunError(f"{run_dir} already holds checkpoints: pass --resume to continue it or choose another --out")
    if cfg.resume:
        import yaml

        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        changed = [k for k in STRUCTURE if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            flags = ", ".join(f"--{_flag(k)}" for k in changed)
            raise RunError(f"--resume: {flags} {'differs' if len(changed) == 1 else 'differ'} from the run's "
                           f"({run_dir / 'config.yaml'}), and its checkpoints' networks depend on "
                           f"{'it' if len(changed) == 1 else 'them'}; leave {'it' if len(changed) == 1 else 'them'} "
                           "out or start a new --out")
    return run_dir


def build_models(cfg: TrainConfig, device: torch.device):
    """The teacher's parts: random init of the preset (seeded, so resume and sampling rebuild the same
    network) or the given weights."""
    from prodistill.models.presets import get_preset
    from prodistill.models.svd import SVDModels

    dtype = resolve_dtype(cfg.dtype, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        models = SVDModels.build(get_preset(cfg.preset), cfg.teacher, device, dtype)
    models.motion_bucket_id, models.noise_aug_strength = cfg.motion_bucket_id, cfg.noise_aug_strength
    return models


def use_dali(cfg: TrainConfig, device: torch.device) -> bool:
    """--decoder for video data: dali when asked (a RunError with the install hint if missing), or for auto
    when DALI is installed and training runs on a GPU."""
    if cfg.decoder == "pyav":
        return False
    if cfg.decoder == "dali":
        from dali_pipelines.video import import_dali

        try:
            import_dali()
        except ImportError as e:
            raise RunError(str(e)) from None
        return True
    return device.type == "cuda" and importlib.util.find_spec("nvidia.dali") is not None


def training_source(cfg: TrainConfig, device: torch.device):
    """What `--data` names, checked cheaply before any model is built: the latent cache's dataset, or the list
    of videos (and, for them, whether the requested decoder is there)."""
    from prodistill.data.cache import LatentCacheDataset, is_cache
    from prodistill.data.dataset import list_videos

    if is_cache(cfg.data):
        if cfg.sizes() != {cfg.size()}:
            raise RunError(f"--data {cfg.data} is a latent cache, which holds clips at one resolution "
                           f"({cfg.resolution}); --stage1-resolution and --resolution-schedule need videos: pass the "
                           "videos as --data, or leave those options out")
        return LatentCacheDataset(cfg.data, cfg)
    files = list_videos(cfg.data, cfg.video_root)
    if use_dali(cfg, device) and device.type != "cuda":
        _check_dali_cpu_codecs(files)
    return files


DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
"""What DALI's CPU video decoder reads (H.264 and HEVC need NVDEC: `--device cuda`)."""


def _check_dali_cpu_codecs(files, sample: int = 16) -> None:
    """--decoder dali off the GPU: the first `sample` videos' codecs, so that H.264 data is one sentence here rather
    than a pipeline error at the first batch."""
    import av

    for entry in files[:sample]:
        try:
            with av.open(str(entry.path)) as container:
                codec = container.streams.video[0].codec_context.name
        except (av.error.FFmpegError, IndexError):
            continue  # an unreadable file is the loader's to report, as for PyAV
        if codec not in DALI_CPU_CODECS:
            raise RunError(f"--decoder dali on the CPU decodes {', '.join(DALI_CPU_CODECS)} only and {entry.path} is "
                           f"{codec}: use --device cuda (NVDEC), --decoder pyav, or re-encode the videos")


def make_loader(cfg: TrainConfig, source, device: torch.device, rank: int = 0, world_size: int = 1,
                size: tuple[int, int] | None = None):
    """A fresh loader (epoch 0) over `source` from `training_source`: rank `rank`'s disjoint share of it, its clips
    at `size` (W, H; default --resolution)."""
    from prodistill.data.dataset import ClipLoader, VideoClipDataset

    shard = dict(seed=cfg.seed, rank=rank, world_size=world_size)
    if not isinstance(source, list):  # the latent cache
        return ClipLoader(source, batch_size=cfg.batch_size, num_workers=cfg.num_workers, **shard)
    dataset = VideoClipDataset(source, num_frames=cfg.frames, fps=cfg.fps, resolution=size or cfg.size(),
                               seed=cfg.seed)
    if use_dali(cfg, device):
        from dali_pipelines.video import DaliClipLoader

        device_id = (device.index or 0) if device.type == "cuda" else None
        return DaliClipLoader(dataset, batch_size=cfg.batch_size, device_id=device_id, **shard)
    return ClipLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, **shard)


def write_preview(run_dir: Path, method, batch: dict, stage: int, step: int, fps: float, seed: int,
                  write: bool = True) -> Path | None:
    """A 1-step student video of the batch's first clip, from its own generator (training RNG untouched). Ranks
    other than 0 generate too (`write=False`: with FSDP the student's forward needs every rank) but write nothing."""
    from prodistill.data.video import write_mp4
    from prodistill.sampling import to_uint8_frames

    generator = torch.Generator(method.generator.device).manual_seed(seed)
    pixels = method.preview({k: v[:1] for k, v in batch.items()}, generator)
    if not write:
        return None
    return write_mp4(run_dir / "samples" / f"stage{stage}-step{step:07d}.mp4", to_uint8_frames(pixels[0]), fps)


def run_training(cfg: TrainConfig) -> Path:
    from prodistill.accel import Speedups, precompile, start_compile_workers

    if distributed.restart_count() > 0 and not cfg.resume and (Path(cfg.out) / "config.yaml").is_file():
        log.info("torchrun restart %d: resuming %s from its last checkpoint", distributed.restart_count(), cfg.out)
        cfg = dataclasses.replace(cfg, resume=True)
    run_dir = check_run_dir(cfg)
    device = resolve_device(cfg.device)
    speedups = Speedups.from_config(cfg, device)
    source = training_source(cfg, device)
    val_videos = _validation_videos(cfg)
    method_class(cfg.method).check(cfg)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RunError("--tensorboard needs the tensorboard package: pip install 'prodistill[tensorboard]'")
    check_targets(cfg)
    start_compile_workers(speedups, device)  # a first launch: they import while the models are built
    dist = distributed.setup(device, cfg.dist_timeout, cfg.parallel)
    try:
        with dist.local_main_first():  # the built-in clips are rendered once per host
            source = training_source(cfg, device)
        models = build_models(cfg, dist.device)
        check_targets(cfg, models.teacher)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "samples").mkdir(exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        dist.barrier()
        logger = MetricsLogger(run_dir, cfg.tensorboard and dist.is_main)
        try:
            for stage in cfg.stages():
                _run_stage(cfg, models, source, stage, run_dir, dist, logger, speedups, val_videos)
        finally:
            logger.close()
        try:
            precompile.finish_background()
        except KeyboardInterrupt:  # the log line offers it: the next launch compiles what is missing
            log.info("not waiting for the background compiles: the next launch compiles what they had left")
    finally:
        distributed.teardown(dist)
    return run_dir


def _validation_videos(cfg) -> list:
    """The --val-data videos (checked before any model is built), or [] without validation."""
    if not cfg.val_data:
        return []
    from prodistill.data.dataset import list_videos

    try:
        videos = list_videos(cfg.val_data, flag="--val-data")
        if cfg.val_i3d is not None:
            from prodistill.eval.features import check_i3d

            check_i3d(cfg.val_i3d, flag="--val-i3d")
    except ValueError as e:
        raise RunError(str(e)) from None
    if len(videos) < 2:
        raise RunError(f"--val-data {cfg.val_data} holds {len(videos)} video; validation FVD needs at least 2")
    return videos


def _run_stage(cfg, models, source, stage, run_dir, dist, logger, speedups, val_videos=()) -> None:
    from prodistill.accel import accelerate, recover_from_oom, release_graphs

    device = dist.device
    stage_dir = run_dir / f"stage{stage}"
    steps = cfg.steps_for(stage)
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is not None and read_meta(ckpt)["step"] >= steps:
        log.info("stage %d already complete (%s)", stage, ckpt)
        return
    generator = torch.Generator(device).manual_seed(dist.rank_seed(cfg.seed + stage))
    with torch.random.fork_rng(devices=[]), dist.sharding_students(models):
        torch.manual_seed(cfg.seed + 1000 * stage)  # LoRA and head init: identical on every (re)start and rank
        method = build_method(cfg, models, stage, generator)
    accelerate(method, models, speedups)
    dist.wrap(method, models)
    if dist.is_main:
        log.info("stage %d speed-ups: %s", stage, speedups.describe())
    loader_at = lambda size: make_loader(cfg, source, device, dist.rank, dist.world_size, size)  # noqa: E731
    loader = loader_at(cfg.size_at(stage, 0))
    preview = lambda m, b, s, k: write_preview(run_dir, m, b, s, k, cfg.fps, cfg.seed, write=dist.is_main)  # noqa: E731
    validator = None
    if val_videos:
        from prodistill.eval.validate import Validator

        # one resolution for the whole stage, so its validations compare: the one the stage ends at
        validator = Validator(cfg.at_resolution(cfg.size_at(stage, steps - 1)), models, run_dir, list(val_videos))
    trainer = Trainer(cfg, method, loader, stage, stage_dir, steps, generator, logger, preview_fn=preview,
                      announce_first_step=speedups.compile != "off" or speedups.cuda_graphs, dist=dist, models=models,
                      validator=validator, loader_at=loader_at, on_resize=lambda: release_graphs(method),
                      on_oom=recover_from_oom)
    if ckpt is not None:
        if dist.is_main:
            log.info("stage %d: resuming from %s (step %d of %d)", stage, ckpt, read_meta(ckpt)["step"], steps)
        trainer.resume(ckpt)  # a damaged file: one sentence (`checkpoint.CheckpointError`)
    else:
        if dist.is_main:  # rows a failed attempt logged before its first checkpoint are about to be redone
            logger.truncate_after(stage, 0)
        if stage == 2 and (stage1 := latest_checkpoint(run_dir / "stage1")) is not None:
            method.load_weights(dist.localize(load_weights(stage1, device), method.weights()))
    trainer.fit()
