"""`prodistill eval`: generate from the first frame of held-out clips with the student and the teacher (same
clips, same conditioning noise, same initial noise), and score both against the real clips.

Metrics: FVD (Fréchet distance of video features, `frechet`, `features`), CLIP image similarity of the
generated frames 1..F−1 to the conditioning image, and temporal consistency (CLIP similarity of neighbouring
frames); the real clips get the two CLIP scores too, as the reference. Every draw is seeded from `--seed` and
the clip index, so two evaluations of one checkpoint give the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prodistill.atomic import atomic_write_text, folder_problem
from prodistill.eval.features import check_clip_folder, check_i3d, clip_scores, load_clip, load_video_features
from prodistill.eval.frechet import GaussianStats, frechet_distance


@dataclass
class EvalOptions:
    ckpt: Path
    data: str
    out: Path = Path("eval")
    video_root: str | None = None
    num_videos: int = 16
    steps: int | None = None
    """Student steps (None: the method's default)."""
    tts: bool = False
    teacher_steps: int = 25
    """0: no teacher row."""
    cfg_scale: float = 3.0
    weights: str = "student"
    i3d: str | None = None
    clip: str | None = None
    real_stats: str | None = None
    seed: int = 0
    device: str = "auto"
    grid_videos: int = 4


def check_inputs(opts: EvalOptions) -> list:
    """Everything that can be checked before a model is built; returns the data's videos."""
    from prodistill.atomic import file_problem
    from prodistill.data.dataset import list_videos

    problem = folder_problem(opts.out, "--out", opts.out)
    if problem is None and opts.real_stats is not None and not Path(opts.real_stats).is_file():
        problem = file_problem(opts.real_stats, "--real-stats")  # not there yet: written after the real clips
    if problem is not None:
        raise ValueError(problem)
    if opts.num_videos < 2:
        raise ValueError(f"--num-videos {opts.num_videos}: FVD compares feature distributions, it needs at least 2 "
                         "videos (published figures use hundreds or more)")
    if opts.i3d is not None:
        check_i3d(opts.i3d)
    if opts.clip is not None:
        check_clip_folder(opts.clip)
    videos = list_videos(opts.data, opts.video_root)
    if len(videos) < 2:
        raise ValueError(f"--data {opts.data} holds {len(videos)} video; FVD needs at least 2")
    return videos


def real_set_meta(cfg, extractor: str, data: str, n: int, seed: int) -> dict:
    """What a real set's feature statistics depend on (kept with them, compared before they are reused)."""
    w, h = cfg.size()
    return {"extractor": extractor, "frames": cfg.frames, "fps": cfg.fps, "resolution": f"{w}x{h}",
            "data": str(data), "num_videos": n, "seed": seed}


def _load_real_stats(path: str | None, meta: dict) -> GaussianStats | None:
    if path is None or not Path(path).is_file():
        return None
    stats = GaussianStats.load(path)
    differ = [k for k in ("extractor", "frames", "fps", "resolution", "data", "num_videos", "seed")
              if stats.meta.get(k) != meta[k]]
    if differ:
        raise ValueError(f"--real-stats {path} was computed with other settings ({', '.join(differ)}: "
                         f"{[stats.meta.get(k) for k in differ]} vs {[meta[k] for k in differ]}); pass another "
                         "file, or delete it to have it computed again")
    return stats


def evaluate(opts: EvalOptions, echo=print) -> dict:
    """Run the evaluation; writes `out/eval.json` and `out/grid.mp4` and returns the JSON's content."""
    from tqdm.auto import tqdm

    from prodistill.data.dataset import VideoClipDataset
    from prodistill.data.video import write_mp4
    from prodistill.diffusion.solvers import bind
    from prodistill.sampling import load_run, sample_student, sample_teacher, to_uint8_frames

    videos = check_inputs(opts)
    run = load_run(Path(opts.ckpt), opts.device, opts.weights)
    cfg, models = run.cfg, run.models
    dev = models.device
    steps = opts.steps or run.steps
    video_net = load_video_features(opts.i3d, dev)
    clip = load_clip(opts.clip, models)
    n = min(opts.num_videos, len(videos))
    width, height = cfg.size()
    dataset = VideoClipDataset(videos, cfg.frames, cfg.fps, (width, height), seed=opts.seed)
    meta = real_set_meta(cfg, video_net.name, opts.data, n, opts.seed)
    real_stats = _load_real_stats(opts.real_stats, meta)
    names = ["student"] + (["teacher"] if opts.teacher_steps > 0 else [])
    feats = {k: [] for k in ["real", *names]}
    scores = {k: [] for k in ["real", *names]}
    grid = []
    shape = models.latent_shape(1, cfg.frames, width, height)
    echo(f"evaluating {n} clips of {opts.data} ({cfg.frames} frames, {width}x{height}): student "
         f"{steps} step{'s' if steps > 1 else ''}{' + TTS' if opts.tts else ''}"
         + (f", teacher {opts.teacher_steps} steps CFG {opts.cfg_scale}" if opts.teacher_steps else "")
         + f"; video features: {video_net.name}; CLIP: {clip.name}")
    for i in tqdm(range(n), desc="eval", unit="clip"):
        j, real, _ = dataset.first_good(i, dataset.load)
        cond = models.condition(real[:1], cfg.frames, cfg.fps, noise=dataset.cond_noise(j)[None])
        clips = {"real": real}
        for name in names:
            generator = torch.Generator(dev).manual_seed(opts.seed * 1_000_003 + j)  # same ε for both
            if name == "student":
                latents = sample_student(bind(models.denoiser(run.student), cond), shape, steps, opts.tts,
                                         cfg.num_timesteps, generator, dev, consistency=run.method.consistency)
            else:
                latents = sample_teacher(models, cond, shape, opts.teacher_steps, 1.0, opts.cfg_scale, generator)
            clips[name] = models.decode(latents)[0].float().cpu()
        for name, video in clips.items():
            if name != "real" or real_stats is None:
                feats[name].append(video_net(video[None])[0])
            scores[name].append(clip_scores(video, real[0], clip))
        if len(grid) < opts.grid_videos:
            grid.append(torch.cat([clips[k] for k in ["real", *names]], dim=-1))  # side by side along the width
    if real_stats is None:
        real_stats = GaussianStats.of(np.stack(feats["real"]), meta)
        if opts.real_stats is not None:
            echo(f"real-set statistics saved to {real_stats.save(opts.real_stats)}")
    result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
              "num_videos": n, "student_steps": steps, "video_features": video_net.name,
              "standard_fvd": video_net.standard, "clip": clip.name, "rows": {}}
    for name in ["real", *names]:
        s = np.array(scores[name])
        row = {"clip_image_similarity": float(s[:, 0].mean()), "temporal_consistency": float(s[:, 1].mean())}
        if name != "real":
            row["fvd"] = frechet_distance(real_stats, GaussianStats.of(np.stack(feats[name])))
        result["rows"][name] = row
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    if grid:
        frames = to_uint8_frames(torch.cat(grid, dim=-2))  # clips stacked along the height
        result["grid"] = str(write_mp4(out / "grid.mp4", frames, cfg.fps))
    return result


def format_eval_table(result: dict) -> str:
    lines = [f"{'':10}{'FVD':>10}{'CLIP→image':>12}{'CLIP t↔t+1':>12}"]
    for name, row in result["rows"].items():
        fvd = f"{row['fvd']:.4g}" if "fvd" in row else "-"
        lines.append(f"{name:10}{fvd:>10}{row['clip_image_similarity']:>12.4f}{row['temporal_consistency']:>12.4f}")
    lines.append(f"{result['num_videos']} clips; video features: {result['video_features']}; CLIP: {result['clip']}")
    if not result["standard_fvd"]:
        lines.append("FVD here uses a random-init stand-in network: compare it only with runs that used the same; "
                     "published FVD needs --i3d i3d_torchscript.pt")
    return "\n".join(lines)
