"""The latent cache: encode every clip once (VAE posterior, CLIP embedding, conditioning latent) so that
training skips the encoders. `prodistill data cache --data ... --out CACHE`, then `train --data CACHE`.

Layout: CACHE/cache.json (what was encoded and how: teacher, preset, resolution, frames, fps, noise
augmentation; the shard list once complete) and CACHE/shard-NNNNN.safetensors, each holding `shard_size`
consecutive videos: `latent_mean`, `latent_std` (the posterior, so training still samples it with the run's
generator), `image_embeds`, `image_latent` (the noise-augmented first frame, with the per-clip noise the
video loader would use) and `index` (the video's position in the source list). Shards are written
atomically and a rerun skips the shards that exist, so an interrupted build resumes where it stopped.

Each video contributes the clip its first epoch would draw; training from the cache therefore reproduces
training from the videos exactly during the first epoch (tested), and sees the same clip again afterwards.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from prodistill.atomic import atomic_temp, atomic_write_text, save_tensors
from prodistill.data.dataset import DataError, VideoClipDataset
from prodistill.data.video import VideoDecodeError

META = "cache.json"
KEYS = ("latent_mean", "latent_std", "image_embeds", "image_latent")
MATCH = ("teacher", "preset", "resolution", "frames", "fps", "noise_aug_strength")
"""Config fields a run must share with the cache it trains from."""


def is_cache(data: str | Path | None) -> bool:
    return data is not None and (Path(data).expanduser() / META).is_file()


def build_cache(cfg, models, videos, out: Path, shard_size: int = 64, batch_size: int = 4) -> tuple[Path, list[str]]:
    """Encode `videos` (entries from `list_videos`) with `models` into `out`, resuming an earlier build; returns `out`
    and the videos that could not be decoded. None decoded: a DataError, and no cache is left for training to take."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(cfg, k) for k in MATCH} | {"seed": cfg.seed, "videos": len(videos), "shard_size": shard_size}
    meta_path = out / META
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise DataError(f"{out} holds a cache built with other settings ({_diff(old, meta)}); "
                            "use another --out or delete it")
    _write_json(meta_path, meta | {"complete": False})
    dataset = VideoClipDataset(videos, cfg.frames, cfg.fps, cfg.size(), cfg.seed)
    shards = range(0, len(videos), shard_size)
    for start in tqdm(shards, desc="caching", unit="shard"):
        path = out / f"shard-{start // shard_size:05d}.safetensors"
        if path.is_file():
            continue
        tensors = {k: [] for k in (*KEYS, "index")}
        for lo in range(start, min(start + shard_size, len(videos)), batch_size):
            idx, clips, noise = [], [], []
            for i in range(lo, min(lo + batch_size, start + shard_size, len(videos))):
                try:
                    clips.append(dataset.load(i))
                except VideoDecodeError as e:
                    warnings.warn(f"skipping {e}", stacklevel=2)
                    continue
                idx.append(i)
                noise.append(dataset.cond_noise(i))
            if not clips:
                continue
            pixels = torch.stack(clips)
            with torch.no_grad():
                mean, std = models.encode_posterior(pixels)
                embeds, image_latent = models.encode_condition(pixels[:, 0], torch.stack(noise))
            for k, v in zip(KEYS, (mean, std, embeds, image_latent)):
                tensors[k].append(v.cpu())
            tensors["index"].append(torch.tensor(idx))
        if tensors["index"]:
            _atomic_save({k: torch.cat(v).contiguous() for k, v in tensors.items()}, path)
    names = sorted(p.name for p in out.glob("shard-*.safetensors"))
    cached = set()
    for name in names:  # this build's shards and those of the build it resumes
        with safe_open(str(out / name), framework="pt") as f:
            cached.update(f.get_tensor("index").tolist())
    skipped = [str(dataset.files[i]) for i in range(len(videos)) if i not in cached]
    if not cached:
        meta_path.unlink()
        if created:
            out.rmdir()
        raise DataError(f"--data: none of its {len(videos)} video(s) could be decoded (e.g. {skipped[0]}), so nothing "
                        "was cached; check those files or pass other videos")
    _write_json(meta_path, meta | {"complete": True, "shards": names, "cached": len(cached), "skipped": skipped})
    return out, skipped


class LatentCacheDataset(torch.utils.data.Dataset):
    """Cached clips in source order; items carry the keys `SVDModels.prepare_batch` reads from a cache."""

    def __init__(self, root: str | Path, cfg=None):
        self.root = Path(root).expanduser()
        self.meta = json.loads((self.root / META).read_text())
        if not self.meta.get("complete"):
            raise DataError(f"{self.root} is an unfinished latent cache: rerun `prodistill data cache` with the "
                            "same arguments to complete it")
        if cfg is not None:
            want = {k: getattr(cfg, k) for k in MATCH}
            if {k: self.meta.get(k) for k in MATCH} != want:
                raise DataError(f"--data {self.root} was cached with other settings ({_diff(self.meta, want)}); "
                                "train with the cache's settings or rebuild it")
        self.locations = []
        for name in self.meta["shards"]:
            with safe_open(str(self.root / name), framework="pt") as f:
                n = f.get_slice("index").get_shape()[0]
            self.locations += [(name, i) for i in range(n)]
        if not self.locations:  # written by an older `data cache` when no video could be decoded
            raise DataError(f"--data {self.root} is a latent cache without a single clip: rebuild it from videos that "
                            "can be decoded")
        self.skipped, self.bad = 0, set()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.locations)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int) -> dict:
        name, row = self.locations[idx]
        with safe_open(str(self.root / name), framework="pt") as f:
            item = {k: f.get_slice(k)[row : row + 1][0] for k in KEYS}
        return item | {"index": idx, "skipped": []}


def _diff(have: dict, want: dict) -> str:
    return ", ".join(f"{k}: {have.get(k)!r} vs {want[k]!r}" for k in want if have.get(k) != want[k])


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = atomic_temp(path)
    try:
        save_tensors(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
