"""Training clips from video files: sampling, resizing, bad-file handling and a resumable loader.

A clip is `num_frames` frames taken at the target fps from a random start (deterministic in
(seed, epoch, index), so worker processes and resumed runs draw the same clips), resized to cover the
training resolution, centre-cropped and scaled to [−1, 1]. A video that cannot be decoded or is too short
is skipped with a warning and counted; it never stops a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prodistill.data.manifest import MANIFEST_SUFFIXES, VideoEntry, read_manifest
from prodistill.data.video import VideoDecodeError, probe_video, read_frames

T = TypeVar("T")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class DataError(ValueError):
    """The data argument cannot be used as given."""


def list_videos(data: str | Path | None, video_root: str | Path | None = None, flag: str = "--data") -> list[VideoEntry]:
    """The videos to train on: the built-in clips (None), every video file under a folder, or the rows of
    a manifest (.csv / .jsonl). Manifest rows whose file is missing are warned about and left out. `flag` names
    the option in errors (e.g. --val-data)."""
    if data is None:
        from prodistill.data.builtin import ensure_builtin_clips

        data = ensure_builtin_clips()
    path = Path(data).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        entries, missing = read_manifest(path, video_root)
        if missing:
            warnings.warn(f"{len(missing)} of {len(missing) + len(entries)} rows of {path} point at missing "
                          f"files and are left out, e.g. {missing[0]}", stacklevel=2)
        return entries
    if not path.is_dir():
        raise DataError(f"{flag} {data}: not a folder or a manifest; pass a folder of video files "
                        f"({', '.join(VIDEO_SUFFIXES)}) or a .csv/.jsonl manifest")
    files = sorted(p for p in path.rglob("*")
                   if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file() and not p.name.startswith("."))  # ._x.mp4, temp files
    if not files:
        raise DataError(f"{flag} {data}: the folder holds no video files ({', '.join(VIDEO_SUFFIXES)})")
    return [VideoEntry(p) for p in files]


def cover_crop(x: Tensor, width: int, height: int) -> Tensor:
    """Resize (N, C, h, w) so it covers (height, width), keeping aspect (antialiased), then centre-crop."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top : top + height, left : left + width]


def clip_indices(num_source_frames: int, source_fps: float, target_fps: float, num_frames: int,
                 rng: np.random.Generator) -> list[int] | None:
    """Frame indices of a clip at `target_fps` from a random start; stride 1 when the video is too short
    at the target rate; None when it is too short even then."""
    stride = max(source_fps / target_fps, 1.0)
    span = (num_frames - 1) * stride
    if span >= num_source_frames:
        if num_frames > num_source_frames:
            return None
        stride, span = 1.0, num_frames - 1
    start = rng.uniform(0, num_source_frames - 1 - span) if num_source_frames - 1 > span else 0.0
    return [min(int(round(start + k * stride)), num_source_frames - 1) for k in range(num_frames)]


class VideoClipDataset(torch.utils.data.Dataset):
    def __init__(self, videos: list[VideoEntry | Path | str], num_frames: int = 14, fps: float = 7.0,
                 resolution: tuple[int, int] = (64, 64), seed: int = 0):
        self.entries = [v if isinstance(v, VideoEntry) else VideoEntry(Path(v)) for v in videos]
        self.files = [e.path for e in self.entries]
        self.num_frames, self.fps = num_frames, fps
        self.width, self.height = resolution
        self.seed, self.epoch = seed, 0
        self.skipped = 0
        self.bad: set[Path] = set()
        self._probed: dict[Path, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def source(self, idx: int) -> tuple[float, int]:
        """(fps, frame count) of video `idx`: from its manifest row when known, else probed (once)."""
        entry = self.entries[idx]
        if entry.fps is not None and entry.num_frames is not None:
            return entry.fps, entry.num_frames
        if entry.path not in self._probed:
            info = probe_video(entry.path)
            self._probed[entry.path] = info.fps, info.num_frames
        return self._probed[entry.path]

    def clip_frames(self, idx: int, epoch: int | None = None) -> list[int]:
        """Frame indices of video `idx`'s clip in `epoch` (default: the current one); raises
        VideoDecodeError when the video is unreadable or too short. Shared with the DALI loader."""
        source_fps, source_frames = self.source(idx)
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, idx))
        indices = clip_indices(source_frames, source_fps, self.fps, self.num_frames, rng)
        if indices is None:
            raise VideoDecodeError(self.files[idx], f"{source_frames} frames, fewer than the {self.num_frames} "
                                   "a clip needs")
        return indices

    def load(self, idx: int) -> Tensor:
        """Clip `idx` as (F, 3, H, W) float in [−1, 1]; raises VideoDecodeError for a bad file."""
        frames = torch.from_numpy(read_frames(self.files[idx], self.clip_frames(idx))).permute(0, 3, 1, 2).float()
        return cover_crop(frames, self.width, self.height) / 127.5 - 1.0

    def cond_noise(self, idx: int, epoch: int | None = None) -> Tensor:
        """The noise SVD adds to the conditioning frame, drawn per clip (seed, epoch, idx) like the clip itself,
        so training from videos, through DALI or from the latent cache conditions on the same frame."""
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, idx, 1))
        return torch.from_numpy(rng.standard_normal((3, self.height, self.width), dtype=np.float32))

    def first_good(self, idx: int, fn: Callable[[int], T]) -> tuple[int, T, list[str]]:
        """(j, fn(j), files found bad on the way) for the first video j ≥ idx (cyclically) where `fn` does not
        raise VideoDecodeError; bad videos are remembered, counted and warned about once."""
        found_bad = []
        for k in range(len(self.files)):
            j = (idx + k) % len(self.files)
            if self.files[j] in self.bad:
                continue
            try:
                return j, fn(j), found_bad
            except VideoDecodeError as e:
                self.bad.add(self.files[j])
                self.skipped += 1
                found_bad.append(str(self.files[j]))
                warnings.warn(f"skipping {e}", stacklevel=2)
        raise DataError(f"none of the {len(self.files)} videos could be decoded into {self.num_frames}-frame clips")

    def __getitem__(self, idx: int) -> dict:
        """Clip `idx`, or the next good one; "skipped" lists the files found bad on the way (so a loader
        can count them even when this runs in a worker process)."""
        j, pixels, found_bad = self.first_good(idx, self.load)
        return {"pixels": pixels, "cond_noise": self.cond_noise(j), "index": j, "skipped": found_bad}


class ClipLoader:
    """Infinite, deterministic, resumable batches of clips, sharded across ranks.

    Epoch e visits `randperm(len)` seeded by seed + e; rank r takes every world_size-th entry (truncated so
    ranks get equal, disjoint shares). `state_dict()` is (epoch, position), enough to continue exactly.
    """

    def __init__(self, dataset: VideoClipDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        if len(dataset) < world_size:
            raise DataError(f"{len(dataset)} videos cannot be shared by {world_size} ranks")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.position = 0, 0
        self.skipped: list[str] = []
        self._iter = None

    def _order(self, epoch: int) -> list[int]:
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        share = len(self.dataset) // self.world_size
        return perm[self.rank :: self.world_size][:share].tolist()

    def _indices(self):
        """(epoch, position-after, index) from the current state onwards, forever."""
        epoch, position = self.epoch, self.position
        while True:
            order = self._order(epoch)
            for i in range(position, len(order)):
                yield epoch, i + 1, order[i]
            epoch, position = epoch + 1, 0

    def _items(self):
        stream = self._indices()
        if self.num_workers == 0:
            for epoch, pos, idx in stream:
                self.dataset.set_epoch(epoch)
                yield epoch, pos, self.dataset[idx]
            return
        # Worker processes: per-item randomness depends only on (seed, epoch, idx), so the epoch travels with
        # the index and the result does not depend on which worker decodes it.
        meta = []

        def indices():
            for epoch, pos, idx in stream:
                meta.append((epoch, pos))
                yield (epoch, idx)

        loader = torch.utils.data.DataLoader(_EpochIndexed(self.dataset), batch_size=None, sampler=indices(),
                                             num_workers=self.num_workers)
        for item in loader:
            epoch, pos = meta.pop(0)
            yield epoch, pos, item

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._items()
        items = []
        for _ in range(self.batch_size):
            self.epoch, self.position, item = next(self._iter)
            items.append(item)
            self.skipped.extend(p for p in item.get("skipped", ()) if p not in self.skipped)  # workers may repeat
        return {k: torch.stack([it[k] for it in items]) for k, v in items[0].items() if isinstance(v, Tensor)}

    def stats(self) -> dict[str, float]:
        """Counters for the metrics log."""
        return {"data/skipped": float(len(self.skipped))}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": list(self.skipped)}

    def close(self) -> None:
        """Stop what runs ahead (worker processes); the next batch starts afresh from the current position."""
        if self._iter is not None:
            self._iter.close()  # its frame held the DataLoader iterator: the workers exit with it
            self._iter = None

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = list(state.get("skipped", []))
        self.dataset.bad.update(Path(p) for p in self.skipped)
        self._iter = None


class _EpochIndexed(torch.utils.data.Dataset):
    """Dataset view indexed by (epoch, idx), for worker processes."""

    def __init__(self, dataset: VideoClipDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, idx = key
        self.dataset.set_epoch(epoch)
        return self.dataset[idx]
