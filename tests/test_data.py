"""Video I/O and built-in clip edge cases: every codec, containers without a frame count, atomic writes,
decode errors, and the built-in folder's build protocol. The dataset and loader are tested in
test_dataset.py; this file covers what `prodistill.data.video` and `prodistill.data.builtin` promise alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from prodistill.data import builtin
from prodistill.data.builtin import ensure_builtin_clips
from prodistill.data.video import VideoDecodeError, VideoInfo, probe_video, read_frames, write_mp4


def _smooth(num_frames: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """A slowly varying colour image drifting by 3 px per frame: easy for any codec at high quality."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([xx * 3 + 3 * k, yy * 4 + 20, 200 - xx * 2 - 3 * k], axis=-1).clip(0, 255)
        for k in range(num_frames)
    ]
    return np.stack(frames).astype(np.uint8)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("codec", "name", "fps"),
    [("h264", "a.mp4", 12.0), ("vp9", "a.mp4", 14.0), ("mpeg4", "a.mp4", 7.0), ("h264", "a.mkv", 7.5)],
)
def test_write_probe_read_round_trip(tmp_path, codec, name, fps):
    frames = _smooth()
    path = write_mp4(tmp_path / name, frames, fps=fps, codec=codec)
    # .mkv has no frame count in its header, so probe_video counts by decoding
    assert probe_video(path) == VideoInfo(num_frames=6, fps=fps, width=64, height=48)
    got = read_frames(path, [5, 0, 5, 2])
    assert got.shape == (4, 48, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(float) - frames[[5, 0, 5, 2]]).mean() < 8
    assert os.listdir(tmp_path) == [name]  # the temporary file was renamed, nothing left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # readable by others, like any new file


def test_write_mp4_rejects_bad_input_before_writing(tmp_path):
    frames = _smooth()
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(tmp_path / "odd.mp4", frames[:, :, :63], fps=7)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "float.mp4", frames.astype(np.float32), fps=7)
    with pytest.raises(ValueError, match="codec"):
        write_mp4(tmp_path / "x.mp4", frames, fps=7, codec="prores")
    assert os.listdir(tmp_path) == []


def test_failed_encode_leaves_no_file(tmp_path):
    (tmp_path / "keep.webm").write_bytes(b"old")
    with pytest.raises(Exception):
        write_mp4(tmp_path / "keep.webm", _smooth(), fps=7, codec="h264")  # WebM cannot hold H.264
    assert os.listdir(tmp_path) == ["keep.webm"] and (tmp_path / "keep.webm").read_bytes() == b"old"


def test_decode_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    short = write_mp4(tmp_path / "short.mp4", _smooth(3), fps=7)
    for call in (lambda: probe_video(corrupt), lambda: read_frames(corrupt, [0])):
        with pytest.raises(VideoDecodeError) as err:
            call()
        assert err.value.path == corrupt
    with pytest.raises(VideoDecodeError, match="3 frames but frame 3 was requested"):
        read_frames(short, [0, 3])
    with pytest.raises(VideoDecodeError, match="cannot open"):
        read_frames(tmp_path / "missing.mp4", [0])
    assert isinstance(VideoDecodeError(short, "x"), RuntimeError)


def test_builtin_clips_format_and_motion_in_every_frame_pair():
    root = ensure_builtin_clips()  # conftest points PRODISTILL_CACHE at a temporary folder
    assert root.parent == Path(os.environ["PRODISTILL_CACHE"]) and (root / "DONE").is_file()
    files = sorted(root.glob("*.mp4"))
    assert len(files) == 8
    for path in files:
        assert probe_video(path) == VideoInfo(num_frames=32, fps=14.0, width=160, height=128)
        frames = read_frames(path, list(range(32))).astype(float)
        step = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
        assert step.min() > 0.5, f"{path.name} has a still frame pair"  # the camera or a sprite always moves


def test_builtin_build_is_all_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_CLIPS", builtin._CLIPS[:2])  # the folder protocol, not the content
    written = []

    def fail_on_second(path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return write_mp4(path, *args, **kwargs)

    monkeypatch.setattr(builtin, "write_mp4", fail_on_second)
    root = tmp_path / "clips"
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin_clips(root)
    assert os.listdir(tmp_path) == []  # neither a half folder nor a leftover build folder

    monkeypatch.setattr(builtin, "write_mp4", write_mp4)
    root.mkdir()  # an empty folder is fine to build into
    assert ensure_builtin_clips(root) == root and len(list(root.glob("*.mp4"))) == 2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "video.mp4").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="no DONE marker"):
        ensure_builtin_clips(foreign)


def test_image_data_and_the_latent_path_import_without_pyav():
    """PyAV (FFmpeg) is imported only by the functions that decode or encode video: MCM's image folders, the
    latent-cache dataset and `bench train` import where it is missing (the GPU machine lacks it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['av'] = None\n"
            "import prodistill.data.images, prodistill.data.dataset, prodistill.methods.mcm, prodistill.bench.train\n"
            "from prodistill.data.video import read_frames\n"
            "try:\n    read_frames('x.mp4', [0])\nexcept ImportError:\n    print('needs av')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "needs av"
