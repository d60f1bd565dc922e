"""Training clips decoded by NVIDIA DALI (`--decoder dali`): the fast twin of `prodistill.data.ClipLoader`.

Why this design rather than DALI's own video reader. DALI 2.4 has three video operators:

* `fn.readers.video` (GPU only; the legacy NVDEC reader) and `fn.experimental.readers.video` (CPU and GPU)
  read a file list themselves and enumerate every `sequence_length`-frame window that starts each `step`
  frames, `stride` frames apart; they shard with `shard_id`/`num_shards` and shuffle in a buffer. Their
  `stride` is an integer, so 30 fps → 7 fps (a stride of 4.29) cannot be expressed; a sample is a window,
  not a video, so a long video is drawn more often than a short one; and the shuffle buffer cannot be
  restored, so a resumed run could only skip as many batches as it had consumed.
* `fn.decoders.video` decodes an in-memory file and takes `frames=` — any list of frame indices per
  sample — on the CPU (VP8/VP9/MJPEG, libavcodec) or the GPU ("mixed": NVDEC, which adds H.264, HEVC, AV1).

We use the decoder and leave the sampling on the host, where it is the CPU path's own: ClipLoader's epoch
permutation and rank shares, VideoClipDataset's bad-file skipping, `clip_indices` (fractional stride,
random start drawn from (seed, epoch, video)). Python reads the file bytes and picks the frame numbers;
decoding, the cover resize, the centre crop, scaling to [−1, 1] and the FHWC → FCHW transpose run in DALI,
on the GPU when a device_id is given. So `DaliClipLoader` yields ClipLoader's clips batch for batch, ranks
get disjoint shares by construction, and its state_dict is ClipLoader's: resume is exact, and a checkpoint
moves between the two decoders.

Where the two paths differ (measured by tests/test_dali.py): DALI converts YUV 4:2:0 to RGB with
bilinear chroma and float arithmetic, PyAV (swscale) repeats each chroma sample and works in fixed point,
so frames agree within a few gray levels where colour varies slowly and differ at sharp colour edges.
DALI's antialiased linear resize matches torch's bilinear antialias except near the borders of the
filter support. DALI rounds a half-pixel cover size up where `cover_crop` rounds half to even (for
example 50 px × 1.25 = 62.5). A video the header says is longer than it is has its missing frames filled
with its last frame (`pad_mode="edge"`) where PyAV raises and skips the file; a stream corrupt mid-file
fails the DALI pipeline instead of being skipped.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from prodistill.data.dataset import ClipLoader, VideoClipDataset

INSTALL_HINT = "pip install 'prodistill[dali]' (NVIDIA DALI for CUDA 13: nvidia-dali-cuda130)"

# One clip as the pipeline takes it: (encoded file bytes uint8 (N,), frame indices int32 (F,)).
Clip = tuple[np.ndarray, np.ndarray]


def import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as err:
        raise ImportError(f"--decoder dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}.") from err
    return dali, fn, types


def _clip(path: str | Path, indices: Sequence[int]) -> Clip:
    return np.fromfile(path, dtype=np.uint8), np.asarray(indices, dtype=np.int32)


def clip_pipeline(source: Callable[[], list[Clip]], batch_size: int, resolution: tuple[int, int],
                  device_id: int | None = None, num_threads: int | None = None, prefetch_queue_depth: int = 2):
    """A built DALI pipeline with one output: a batch of clips (F, 3, H, W) float32 in [−1, 1].

    `source()` returns the next batch as `batch_size` clips; DALI calls it in order, up to
    `prefetch_queue_depth` batches ahead of `run()`. `resolution` is (width, height): each frame is
    resized to cover it keeping its aspect and centre-cropped, as `prodistill.data.cover_crop` does. With a
    `device_id` NVDEC decodes and every op runs on that GPU; with None everything runs on the CPU, which
    decodes VP8/VP9/MJPEG only.
    """
    dali, fn, types = import_dali()
    width, height = resolution
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads or min(4, os.cpu_count() or 1),
                         device_id=device_id, prefetch_queue_depth=prefetch_queue_depth)

    def columns():
        return tuple(list(column) for column in zip(*source()))

    with pipe:
        encoded, frames = fn.external_source(source=columns, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.INT32], ndim=[1, 1])
        video = fn.decoders.video(encoded, frames=frames, pad_mode="edge",
                                  device="cpu" if device_id is None else "mixed")  # (F, h, w, 3) uint8
        # subpixel_scale=False: each axis is scaled by out/in as in torch's interpolate, not by one factor.
        video = fn.resize(video, size=[height, width], mode="not_smaller", subpixel_scale=False,
                          interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
        # rounding="truncate": the crop starts at ⌊(n − H)/2⌋, as in cover_crop.
        video = fn.crop_mirror_normalize(video, crop=[height, width], crop_pos_x=0.5, crop_pos_y=0.5,
                                         rounding="truncate", mean=127.5, std=127.5, output_layout="FCHW",
                                         dtype=types.FLOAT)
        pipe.set_outputs(video)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device_id: int | None) -> torch.Tensor:
    """A DALI batch of equal-shaped samples as one torch tensor, copied (DALI reuses its buffers) on the
    current torch stream of cuda:device_id, or on the CPU; GPU data never passes through host memory."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device_id is not None else None)
    return out


def decode_clip(path: str | Path, indices: Sequence[int], resolution: tuple[int, int],
                device_id: int | None = None) -> torch.Tensor:
    """Frames `indices` of `path` through the DALI pipeline: (F, 3, H, W) float32 in [−1, 1].

    The twin of `cover_crop(read_frames(path, indices)) / 127.5 − 1`, for parity tests and tools; it builds
    a pipeline per call, so it is not for training.
    """
    clip = _clip(path, indices)
    (clips,) = clip_pipeline(lambda: [clip], 1, resolution, device_id, num_threads=1, prefetch_queue_depth=1).run()
    return _to_torch(clips, device_id)[0]


class DaliClipLoader(ClipLoader):
    """ClipLoader with DALI decoding: the same clips in the same order, `{"pixels": (B, F, 3, H, W)}`.

    Takes ClipLoader's arguments (a `VideoClipDataset`, batch size, seed, rank, world_size) and yields float32
    in [−1, 1] on cuda:device_id, or on the CPU when device_id is None (VP8/VP9/MJPEG only). A video that
    cannot be probed or is too short is skipped with a warning and listed in `skipped`, as there.

    `state_dict()` is ClipLoader's, taken after the last batch handed out (the batches DALI has decoded
    ahead do not count), so `load_state_dict` resumes exactly, also from a ClipLoader checkpoint: it drops
    the pipeline and the next batch starts a new one from the loaded state.
    """

    def __init__(self, dataset: VideoClipDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device_id: int | None = None, num_threads: int | None = None,
                 prefetch_queue_depth: int = 2):
        import_dali()
        if device_id is not None and not torch.cuda.is_available():
            raise RuntimeError(f"DaliClipLoader(device_id={device_id}) needs a CUDA GPU and none is visible; "
                               "pass device_id=None to decode VP9/MJPEG videos on the CPU.")
        super().__init__(dataset, batch_size, seed=seed, rank=rank, world_size=world_size)
        self.device_id, self.num_threads, self.prefetch_queue_depth = device_id, num_threads, prefetch_queue_depth
        self._pipe = None
        self._fed: deque[tuple[int, int, torch.Tensor]] = deque()  # (epoch, position, cond noise) per batch fed

    def _sample(self, epoch: int, idx: int) -> tuple[Clip, torch.Tensor]:
        """The clip VideoClipDataset gives for `idx` in `epoch` (the next good video where it is bad), and its
        conditioning noise."""
        ds = self.dataset
        j, indices, found_bad = ds.first_good(idx, lambda k: ds.clip_frames(k, epoch))
        self.skipped.extend(p for p in found_bad if p not in self.skipped)
        return _clip(ds.files[j], indices), ds.cond_noise(j, epoch)

    def _items(self):
        for epoch, position, idx in self._indices():
            yield epoch, position, self._sample(epoch, idx)

    def _feed(self) -> list[Clip]:
        """The next batch for DALI's external source, which calls this ahead of `__next__`."""
        clips, noise = [], []
        for _ in range(self.batch_size):
            epoch, position, (clip, cond_noise) = next(self._iter)
            clips.append(clip)
            noise.append(cond_noise)
        self._fed.append((epoch, position, torch.stack(noise)))
        return clips

    def close(self) -> None:
        """Drop the pipeline (its decoders, threads and prefetched batches); the next batch builds a new one from the
        current position."""
        super().close()
        self._pipe = None
        self._fed.clear()

    def __next__(self) -> dict:
        if self._iter is None:  # the first batch, or the first after load_state_dict
            self._iter, self._pipe = self._items(), None  # drops the old pipeline before building one
            self._fed.clear()
            self._pipe = clip_pipeline(self._feed, self.batch_size, (self.dataset.width, self.dataset.height),
                                       self.device_id, self.num_threads, self.prefetch_queue_depth)
        (clips,) = self._pipe.run()
        self.epoch, self.position, noise = self._fed.popleft()
        pixels = _to_torch(clips, self.device_id)
        return {"pixels": pixels, "cond_noise": noise.to(pixels.device, non_blocking=True)}
