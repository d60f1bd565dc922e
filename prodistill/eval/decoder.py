"""`prodistill eval-decoder`: the tiny decoder against the full one on held-out clips — PSNR and SSIM of its
frames against the full decoder's (and of both against the real frames), temporal flicker, and the decode time
and peak memory of both decoders at one shape, in one run.

Flicker is the mean absolute difference between the frame-to-frame changes of the two decoders' outputs,
mean |Δ_t tiny − Δ_t full| (0: the tiny decoder moves exactly as the full one). SSIM is the usual Gaussian-window
form (11×11, σ = 1.5, Wang et al. 2004) per colour channel on [−1, 1] frames (data range 2). LPIPS is not
computed: its network weights cannot be fetched here.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prodistill.atomic import atomic_write_text


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> float:
    mse = (x.float() - y.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM of frames (N, C, H, W) (each channel on its own, valid windows only)."""
    x, y = x.float().flatten(0, 1)[:, None], y.float().flatten(0, 1)[:, None]
    size = min(11, *x.shape[-2:])
    w = _gaussian_window(size - (size + 1) % 2).to(x)  # an odd window no larger than the frames
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx, vy = F.conv2d(x * x, w) - mx**2, F.conv2d(y * y, w) - my**2
    cov = F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def flicker(tiny: Tensor, full: Tensor) -> float:
    """mean |Δ_t tiny − Δ_t full| of clips (B, F, ...)."""
    return ((tiny[:, 1:] - tiny[:, :-1]) - (full[:, 1:] - full[:, :-1])).abs().mean().item()


def time_decoder(fn, latents: Tensor, repeats: int = 5) -> tuple[float, float | None]:
    """(median seconds per decode, peak GPU memory in GB or None on the CPU) of `fn(latents)`, after a warm-up."""
    cuda = latents.device.type == "cuda"
    with torch.no_grad():
        fn(latents)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(latents)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 1e9 if cuda else None


@dataclass
class DecoderEvalOptions:
    decoder: Path
    """RUN/decoder (or the train-decoder run folder holding it)."""
    data: str
    num_videos: int = 8
    time_resolution: str | None = None
    """WxH at which both decoders are timed (default: the run's)."""
    repeats: int = 5
    seed: int = 0
    device: str = "auto"
    out: Path = Path("eval-decoder")


def _folders(path: Path) -> tuple[Path, Path]:
    """(decoder folder, run folder) from either."""
    from prodistill.models.tiny_decoder import CONFIG_FILE

    path = Path(path)
    folder = path if (path / CONFIG_FILE).is_file() else path / "decoder"
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"--decoder {path}: no tiny decoder there; pass the folder `prodistill train-decoder` wrote "
                         "(RUN/decoder) or its run folder")
    run = folder.parent
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} has no config.yaml: keep the decoder folder inside its train-decoder run folder, "
                         "which says which teacher it was distilled from")
    return folder, run


def evaluate_decoder(opts: DecoderEvalOptions, echo=print) -> dict:
    from tqdm.auto import tqdm

    from prodistill.config import build_config
    from prodistill.data.dataset import VideoClipDataset, list_videos
    from prodistill.models.tiny_decoder import TinyTemporalDecoder
    from prodistill.training.run import build_models, resolve_device

    folder, run = _folders(opts.decoder)
    videos = list_videos(opts.data)
    cfg = build_config({"device": opts.device}, run / "config.yaml")
    tw, th = replace(cfg, resolution=opts.time_resolution or cfg.resolution).size()  # checked before any model
    device = resolve_device(cfg.device)
    models = build_models(cfg, device)
    tiny = TinyTemporalDecoder.load(folder, device)
    width, height = cfg.size()
    dataset = VideoClipDataset(videos, cfg.frames, cfg.fps, (width, height), seed=opts.seed)
    n = min(opts.num_videos, len(videos))
    generator = torch.Generator(device).manual_seed(opts.seed)
    sums = {k: 0.0 for k in ("psnr", "ssim", "flicker", "psnr_full_vs_real", "psnr_tiny_vs_real")}
    for i in tqdm(range(n), desc="eval-decoder", unit="clip"):
        _, real, _ = dataset.first_good(i, dataset.load)
        with torch.no_grad():
            z = models.encode_video(real[None].to(device), generator)
            full = models.decode(z).float().cpu()
            small = tiny(z).float().clamp(-1, 1).cpu()
        sums["psnr"] += psnr(small, full)
        sums["ssim"] += ssim(small[0], full[0])
        sums["flicker"] += flicker(small, full)
        sums["psnr_full_vs_real"] += psnr(full[0], real)
        sums["psnr_tiny_vs_real"] += psnr(small[0], real)
    quality = {k: v / n for k, v in sums.items()}
    latents = torch.randn(models.latent_shape(1, cfg.frames, tw, th), generator=generator, device=device)
    echo(f"timing both decoders at {cfg.frames}x{th}x{tw} on {device}...")
    full_s, full_gb = time_decoder(models.decode, latents, opts.repeats)
    with models.autocast():
        tiny_s, tiny_gb = time_decoder(tiny, latents, opts.repeats)
    result = {"decoder": str(folder), "teacher": cfg.teacher or f"{cfg.preset} (random weights)",
              "num_videos": n, "frames": cfg.frames, "resolution": f"{width}x{height}", "quality": quality,
              "timing": {"shape": f"{cfg.frames}x{th}x{tw}", "device": str(device),
                         "full": {"seconds": full_s, "peak_gb": full_gb},
                         "tiny": {"seconds": tiny_s, "peak_gb": tiny_gb}, "speedup": full_s / tiny_s},
              "parameters": {"tiny": sum(p.numel() for p in tiny.parameters()),
                             "full": sum(p.numel() for p in models.vae.decoder.parameters())}}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval-decoder.json", json.dumps(result, indent=2))
    return result


def format_decoder_table(r: dict) -> str:
    q, t = r["quality"], r["timing"]
    mem = lambda g: f"{g:.2f} GB" if g is not None else "-"  # noqa: E731
    return "\n".join([
        f"tiny vs full decoder on {r['num_videos']} clips ({r['frames']} frames, {r['resolution']}; teacher "
        f"{r['teacher']}):",
        f"  PSNR {q['psnr']:.2f} dB   SSIM {q['ssim']:.4f}   flicker {q['flicker']:.4f}",
        f"  against the real frames: full decoder {q['psnr_full_vs_real']:.2f} dB, tiny {q['psnr_tiny_vs_real']:.2f} dB",
        f"  decode {t['shape']} on {t['device']}: full {t['full']['seconds'] * 1e3:.1f} ms ({mem(t['full']['peak_gb'])}), "
        f"tiny {t['tiny']['seconds'] * 1e3:.1f} ms ({mem(t['tiny']['peak_gb'])}), {t['speedup']:.1f}x",
        f"  parameters: tiny {r['parameters']['tiny'] / 1e6:.2f} M, full {r['parameters']['full'] / 1e6:.1f} M",
    ])
