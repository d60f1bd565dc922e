"""Video file I/O on the CPU through PyAV (FFmpeg).

This is the reference decode path: the DALI GPU pipelines in `dali_pipelines/` must produce the same
frames, and every CPU-only run (tests, the embedded default, machines without DALI) trains from it. It is
written for short clips, so `read_frames` decodes sequentially from the start and keeps the wanted frames
instead of seeking: seeking in H.264 lands on keyframes and is exactly where decoders disagree, while a
linear decode of a few dozen frames is cheap and gives the same frame numbering as DALI's.

Writing is atomic (encode to a temporary file beside the target, then `os.replace`) so a crash or a
concurrent reader never sees a half-written video, and the pixel format is always yuv420p so that the
files open in ordinary players and in DALI's NVDEC decoder. PyAV is imported by the functions that use it, so
code that only needs this module's names (image folders, the latent cache) runs where FFmpeg is not installed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

# codec name -> (FFmpeg encoder, encoder options). The quality settings keep the round-trip error of
# smooth images to a few gray levels, so fixtures and the built-in clips are close to their source.
_ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    # x264's macroblock tree (rate control over its lookahead) made the same frames encode differently from run
    # to run (PyAV 17-18.1 wheels: 39 distinct files of 40 for one built-in clip); without it they are the same
    "h264": ("libx264", {"crf": "17", "preset": "medium", "x264-params": "mbtree=0"}),
    "vp9": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}),
    # MPEG-4 part 2 has no CRF; a fixed quantiser of 2 (FF_QP2LAMBDA = 118 per unit) is its near-lossless mode.
    "mpeg4": ("mpeg4", {"flags": "+qscale", "global_quality": str(2 * 118)}),
}


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, has no video stream, is corrupt, or has fewer frames than asked for."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What a training sampler needs to know about a video before decoding it."""

    num_frames: int
    fps: float
    width: int
    height: int


def write_mp4(path: str | Path, frames_fhwc: np.ndarray, fps: float, codec: str = "h264") -> Path:
    """Encode RGB frames `frames_fhwc` (uint8, F×H×W×3) to `path` at `fps` frames per second.

    `codec` is "h264" (libx264), "vp9" (libvpx-vp9) or "mpeg4". The container is chosen by the file
    suffix (.mp4, .mkv, .webm, ...). H and W must be even because the pixel format is yuv420p.
    Returns the path written.
    """
    import av

    path = Path(path)
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {codec!r}.")
    if frames_fhwc.dtype != np.uint8 or frames_fhwc.ndim != 4 or frames_fhwc.shape[-1] != 3:
        raise ValueError(
            f"frames must be a uint8 array of shape (F, H, W, 3), got {frames_fhwc.dtype} {frames_fhwc.shape}."
        )
    num_frames, height, width, _ = frames_fhwc.shape
    if num_frames == 0:
        raise ValueError("frames must hold at least one frame.")
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p video needs an even width and height, got {width}x{height}; crop or pad by one pixel.")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}.")

    encoder, options = _ENCODERS[codec]
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: that file would keep mode 0600 after the rename; FFmpeg creates it with the umask's mode.
    tmp_name = str(path.parent / f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        with av.open(tmp_name, mode="w") as container:
            stream = container.add_stream(encoder, rate=rate, options=options)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / rate
            stream.time_base = 1 / rate  # a request: the muxer may pick a finer one (mp4 does)
            for index, rgb_hwc in enumerate(frames_fhwc):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb_hwc), format="rgb24")
                frame.pts = index
                frame.time_base = 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _open(path: Path) -> av.container.InputContainer:
    import av

    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise VideoDecodeError(path, f"cannot open ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "the file has no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream of `path`.

    The frame count comes from the container header when it has one (mp4); otherwise (mkv, webm) the
    stream is decoded and counted, which is slow for long videos but exact.
    """
    import av

    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoDecodeError(path, "the video stream has no frame rate")
        num_frames = stream.frames
        try:
            if num_frames == 0:
                stream.thread_type = "AUTO"
                num_frames = sum(1 for _ in container.decode(stream))
        except av.error.FFmpegError as err:
            raise VideoDecodeError(path, f"corrupt stream while counting frames ({err})") from err
        return VideoInfo(
            num_frames=num_frames,
            fps=float(rate),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
        )


def read_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Decode frames `indices` (0-based, in presentation order, repeats allowed) of `path`.

    Returns uint8 RGB frames (len(indices), H, W, 3) in the order of `indices`. Raises VideoDecodeError
    when the file is unreadable or corrupt, or ends before the largest index.
    """
    import av

    path = Path(path)
    if len(indices) == 0:
        raise ValueError("indices must name at least one frame.")
    if min(indices) < 0:
        raise ValueError(f"frame indices must be non-negative, got {min(indices)}.")
    wanted = set(indices)
    last = max(wanted)
    decoded: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = 0
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    # one scaling thread: PyAV 18.1.1 keeps a threaded swscale context across calls, and a
                    # DataLoader worker forked after the parent decoded inherits it without its threads, so a
                    # threaded conversion there waits forever (17.0.0 did not; `threads` needs PyAV ≥ 17)
                    decoded[count] = frame.to_ndarray(format="rgb24", threads=1)
                count += 1
                if count > last:
                    break
        except av.error.FFmpegError as err:
            raise VideoDecodeError(path, f"corrupt stream at frame {count} ({err})") from err
    if count <= last:
        raise VideoDecodeError(path, f"it has {count} frames but frame {last} was requested")
    return np.stack([decoded[i] for i in indices])
