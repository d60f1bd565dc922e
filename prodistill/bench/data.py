"""`prodistill bench data`: how fast clips are decoded (DALI on the GPU, PyAV on the CPU, same files, same
clips) next to how fast the training step consumes them, in one run. SPEC §6 asks for DALI ≥ 5× consumption.

Decode throughput is clips per second over `batches` batches after one warm-up batch. Consumption is
batch size / seconds per OSV stage-2 step, measured with the real trainer on one batch replayed in memory
(so no decode cost is counted), on the preset and resolution asked for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from prodistill.atomic import atomic_write_text


def _clips_per_second(loader, batches: int, device: torch.device) -> float:
    next(loader)  # warm-up: pipeline build, first decode, file cache
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * batch["pixels"].shape[0] / (time.perf_counter() - start)


class _Replay:
    """A loader that hands out the same batch forever (the training step without any decode cost)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __next__(self) -> dict:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_step_seconds(cfg, device: torch.device, batch: dict, steps: int, run_dir: Path) -> float:
    """Median seconds per OSV stage-2 step (after one warm-up step) with the real trainer."""
    from prodistill.methods import build_method
    from prodistill.training.logger import MetricsLogger, read_metrics
    from prodistill.training.run import build_models
    from prodistill.training.trainer import Trainer

    models = build_models(cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    method = build_method(cfg, models, 2, generator)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, method, _Replay(batch), 2, run_dir / "stage2", steps + 1, generator,
                      MetricsLogger(run_dir))
    trainer.fit()
    per_step = sorted(r["perf/sec_per_step"] for r in read_metrics(run_dir)[1:])
    return per_step[len(per_step) // 2]


def run_data_bench(cfg, device: torch.device, batches: int, train_steps: int, workers: int, out_dir: Path,
                   echo=print) -> dict:
    from prodistill.data.dataset import ClipLoader, VideoClipDataset, list_videos

    files = list_videos(cfg.data, cfg.video_root)
    dataset = lambda: VideoClipDataset(files, cfg.frames, cfg.fps, cfg.size(), cfg.seed)  # noqa: E731
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "videos": len(files), "resolution": cfg.resolution, "frames": cfg.frames,
              "batch_size": cfg.batch_size, "preset": cfg.preset}
    echo(f"PyAV, {workers} worker(s) ...")
    result["pyav_clips_per_s"] = _clips_per_second(
        ClipLoader(dataset(), cfg.batch_size, cfg.seed, num_workers=workers), batches, torch.device("cpu"))
    if device.type == "cuda":
        try:
            from dali_pipelines.video import DaliClipLoader

            echo("DALI on the GPU ...")
            loader = DaliClipLoader(dataset(), cfg.batch_size, cfg.seed, device_id=device.index or 0)
            result["dali_clips_per_s"] = _clips_per_second(loader, batches, device)
        except ImportError as e:
            result["dali_unavailable"] = str(e)
    else:
        result["dali_unavailable"] = "DALI decodes H.264 on the GPU only; run with --device cuda"
    echo(f"training step ({cfg.preset}, {cfg.resolution}, OSV stage 2) ...")
    batch = next(ClipLoader(dataset(), cfg.batch_size, cfg.seed))
    seconds = train_step_seconds(cfg, device, batch, train_steps, out_dir / "train")
    result["train_sec_per_step"] = seconds
    result["train_clips_per_s"] = cfg.batch_size / seconds
    for name in ("pyav", "dali"):
        if f"{name}_clips_per_s" in result:
            result[f"{name}_over_consumption"] = result[f"{name}_clips_per_s"] / result["train_clips_per_s"]
    return result


def format_data_table(r: dict) -> str:
    rows = [("PyAV (CPU)", r.get("pyav_clips_per_s"), r.get("pyav_over_consumption")),
            ("DALI (GPU)", r.get("dali_clips_per_s"), r.get("dali_over_consumption")),
            ("training step consumes", r["train_clips_per_s"], 1.0)]
    lines = [f"device {r['device']}, {r['videos']} videos, {r['frames']} frames at {r['resolution']}, "
             f"batch {r['batch_size']}, preset {r['preset']}",
             f"{'':24}{'clips/s':>10}{'× consumption':>16}"]
    for name, rate, ratio in rows:
        lines.append(f"{name:24}{'n/a' if rate is None else f'{rate:10.2f}':>10}"
                     f"{'' if ratio is None else f'{ratio:16.2f}':>16}")
    if "dali_unavailable" in r:
        lines.append(f"DALI not measured: {r['dali_unavailable']}")
    return "\n".join(lines)


def write_data_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return path
