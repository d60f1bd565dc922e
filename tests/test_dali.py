"""The DALI decode path (`dali_pipelines.video`) against the PyAV reference path (`prodistill.data`).

On the CPU DALI decodes VP9 only, so the fixtures are VP9 in Matroska; the GPU test repeats the parity
check with H.264 through NVDEC. Fixture frames are a moving gray texture (so every frame differs from its
neighbours) plus a slowly varying colour: PyAV's swscale repeats each 4:2:0 chroma sample where DALI
interpolates it, and the two agree to a few gray levels only where chroma varies slowly (sharp colour
edges differ by tens of levels — see the module docstring of dali_pipelines/video.py).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from prodistill.data.dataset import ClipLoader, VideoClipDataset, clip_indices, cover_crop
from prodistill.data.video import read_frames, write_mp4

LEVEL = 1 / 127.5  # one 8-bit gray level in [−1, 1] units
# Same clip, same size: the difference is colour conversion alone. DALI's (CPU and NVDEC alike) is BT.601
# limited range with bilinear chroma, within 1.6 levels of exact float arithmetic; swscale's repeats chroma
# and works in fixed point (1.2 levels mean from exact). Measured: VP9/CPU max 3.0 mean 1.2 levels, H.264/H100
# max 4.0 mean 1.7.
IDENTITY_MAX, IDENTITY_MEAN = 4.5 * LEVEL, 2 * LEVEL
# Resized: the same plus DALI's antialiased linear filter, which is not torch's near the borders of its support.
RESIZED_MAX, RESIZED_MEAN = 6 * LEVEL, 2 * LEVEL


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


def _frames(num_frames: int, height: int, width: int, tint: float = 0.0) -> np.ndarray:
    """uint8 (F, H, W, 3): a gray texture moving frame by frame plus a smooth colour field."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    colour = np.stack([30 * np.sin(xx / 40 + 1), 20 * np.cos(yy / 30), -25 * np.sin((xx + yy) / 50)], -1)
    frames = [128 + tint + 60 * np.sin(xx / 3 + 0.9 * t) * np.cos(yy / 4 - 0.4 * t) for t in range(num_frames)]
    return (np.stack(frames)[..., None] + colour).round().clip(0, 255).astype(np.uint8)


def _reference(path, indices, resolution) -> torch.Tensor:
    """The PyAV path's clip: read_frames → cover_crop → [−1, 1], as VideoClipDataset.load does it."""
    frames = torch.from_numpy(read_frames(path, indices)).permute(0, 3, 1, 2).float()
    return cover_crop(frames, *resolution) / 127.5 - 1.0


@pytest.fixture(scope="module")
def vp9_video(dali, tmp_path_factory):
    """30 frames of 64×48 at 24 fps."""
    return write_mp4(tmp_path_factory.mktemp("dali") / "clip.mkv", _frames(30, 48, 64), fps=24, codec="vp9")


@pytest.fixture(scope="module")
def vp9_folder(dali, tmp_path_factory):
    """Four 48×48 videos, 16 frames at 24 fps; video k is brighter by 20·k gray levels."""
    folder = tmp_path_factory.mktemp("dali_set")
    return [write_mp4(folder / f"v{k}.mkv", _frames(16, 48, 48, tint=20.0 * k - 30), fps=24, codec="vp9")
            for k in range(4)]


def test_missing_dali_says_how_to_install(monkeypatch, tmp_path):
    from dali_pipelines.video import DaliClipLoader

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    dataset = VideoClipDataset([tmp_path / "a.mp4"], num_frames=2)
    with pytest.raises(ImportError, match=r"pip install 'prodistill\[dali\]'"):
        DaliClipLoader(dataset, batch_size=1)


def test_identity_size_matches_pyav(vp9_video):
    from dali_pipelines.video import decode_clip

    indices = [0, 3, 7, 11, 12, 29]
    clip = decode_clip(vp9_video, indices, (64, 48))
    ref = _reference(vp9_video, indices, (64, 48))
    assert clip.shape == ref.shape == (6, 3, 48, 64) and clip.dtype == torch.float32
    err = (clip - ref).abs()
    assert err.max() <= IDENTITY_MAX and err.mean() <= IDENTITY_MEAN, (err.max().item(), err.mean().item())


@pytest.mark.parametrize("resolution", [(32, 32), (40, 24), (96, 64)])
def test_resized_matches_pyav(vp9_video, resolution):
    from dali_pipelines.video import decode_clip

    indices = [1, 5, 9]
    clip = decode_clip(vp9_video, indices, resolution)
    ref = _reference(vp9_video, indices, resolution)
    assert clip.shape == ref.shape == (3, 3, resolution[1], resolution[0])
    err = (clip - ref).abs()
    assert err.max() <= RESIZED_MAX and err.mean() <= RESIZED_MEAN, (err.max().item(), err.mean().item())
    # The resize and crop alone, on the same decoded frames: DALI in the pipeline vs cover_crop in torch.
    same_frames = cover_crop((decode_clip(vp9_video, indices, (64, 48)) + 1) * 127.5, *resolution) / 127.5 - 1
    err = (clip - same_frames).abs()
    assert err.max() <= 2 * LEVEL and err.mean() <= 0.1 * LEVEL, (err.max().item(), err.mean().item())


def test_loader_picks_the_frames_clip_indices_picks(vp9_video):
    """24 fps → 7 fps is a stride of 3.43: the frames DALI decodes are the ones clip_indices names."""
    from dali_pipelines.video import DaliClipLoader

    dataset = VideoClipDataset([vp9_video], num_frames=4, fps=7.0, resolution=(64, 48), seed=3)
    loader = DaliClipLoader(dataset, batch_size=1)
    every_frame = _reference(vp9_video, list(range(30)), (64, 48))
    for epoch in range(3):  # one video, one clip per epoch, a new random start each
        clip = next(loader)["pixels"][0]
        decoded = [int((every_frame - frame).abs().mean((1, 2, 3)).argmin()) for frame in clip]
        expected = clip_indices(30, 24.0, 7.0, 4, np.random.default_rng((3, epoch, 0)))
        assert decoded == expected
        assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (epoch, 1)


def test_loader_matches_clip_loader(vp9_folder):
    """The same dataset and seed give ClipLoader's batches, in order, and its state after each."""
    from dali_pipelines.video import DaliClipLoader

    def dataset():
        return VideoClipDataset(vp9_folder, num_frames=3, fps=12.0, resolution=(48, 48), seed=1)

    dali_loader = DaliClipLoader(dataset(), batch_size=2, seed=5)
    pyav_loader = ClipLoader(dataset(), batch_size=2, seed=5)
    for _ in range(3):  # crosses an epoch boundary (4 videos, 2 per batch)
        batch, ref = next(dali_loader)["pixels"], next(pyav_loader)["pixels"]
        assert batch.shape == (2, 3, 3, 48, 48) and batch.dtype == torch.float32 and batch.device.type == "cpu"
        assert -1.0 <= batch.min() and batch.max() <= 1.0
        err = (batch - ref).abs()
        assert err.max() <= IDENTITY_MAX and err.mean() <= IDENTITY_MEAN, (err.max().item(), err.mean().item())
        assert dali_loader.state_dict() == pyav_loader.state_dict()


def _video_ids(pixels: torch.Tensor) -> list[int]:
    """Which fixture video each clip of a batch came from, by its brightness (20 gray levels apart)."""
    means = (pixels.mean((1, 2, 3, 4)) + 1) * 127.5
    return [int(round((m.item() - 128 + 30) / 20)) for m in means]


def test_shards_are_disjoint(vp9_folder):
    from dali_pipelines.video import DaliClipLoader

    seen = []
    for rank in range(2):
        dataset = VideoClipDataset(vp9_folder, num_frames=2, fps=24.0, resolution=(48, 48))
        loader = DaliClipLoader(dataset, batch_size=2, rank=rank, world_size=2)
        seen.append(set(_video_ids(next(loader)["pixels"])))  # one batch is a rank's whole epoch
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {0, 1, 2, 3}


def test_bad_video_is_skipped(vp9_folder, tmp_path):
    from dali_pipelines.video import DaliClipLoader

    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"not a video" * 100)
    dataset = VideoClipDataset([bad, vp9_folder[0]], num_frames=2, fps=24.0, resolution=(48, 48))
    loader = DaliClipLoader(dataset, batch_size=2)
    with pytest.warns(UserWarning, match="skipping"):
        batch = next(loader)["pixels"]
    assert _video_ids(batch) == [0, 0] and loader.skipped == [str(bad)]


def test_resume_is_exact(vp9_folder):
    from dali_pipelines.video import DaliClipLoader

    def loader():
        dataset = VideoClipDataset(vp9_folder, num_frames=2, fps=24.0, resolution=(32, 32))
        return DaliClipLoader(dataset, batch_size=1, seed=2, prefetch_queue_depth=2)

    first = loader()
    next(first)
    state = first.state_dict()
    expected = [next(first)["pixels"] for _ in range(4)]  # DALI has decoded ahead of this state
    resumed = loader()
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(next(resumed)["pixels"], batch)


@pytest.mark.gpu
def test_gpu_h264_matches_pyav(dali, tmp_path):
    """H.264 decoded by NVDEC on cuda:0 against PyAV, identity size and resized, and a loader batch."""
    from dali_pipelines.video import DaliClipLoader, decode_clip

    video = write_mp4(tmp_path / "clip.mp4", _frames(30, 48, 64), fps=24, codec="h264")
    indices = [0, 3, 7, 11, 12, 29]
    cases = [((64, 48), IDENTITY_MAX, IDENTITY_MEAN), ((40, 24), RESIZED_MAX, RESIZED_MEAN)]
    for resolution, max_err, mean_err in cases:
        clip = decode_clip(video, indices, resolution, device_id=0)
        assert clip.device == torch.device("cuda", 0)
        err = (clip.cpu() - _reference(video, indices, resolution)).abs()
        assert err.max() <= max_err and err.mean() <= mean_err, (resolution, err.max().item(), err.mean().item())
    def dataset():
        return VideoClipDataset([video], num_frames=4, fps=7.0, resolution=(64, 48))

    batch = next(DaliClipLoader(dataset(), batch_size=2, device_id=0))["pixels"]
    ref = next(ClipLoader(dataset(), batch_size=2))["pixels"]
    assert batch.shape == (2, 4, 3, 48, 64) and batch.device == torch.device("cuda", 0)
    assert (batch.cpu() - ref).abs().max() <= IDENTITY_MAX


def test_train_cli_with_dali_decoder_on_cpu(dali, tmp_path):
    """`--decoder dali` drives a training run (DALI's CPU backend, VP9) and logs like the PyAV path."""
    from click.testing import CliRunner

    from prodistill.cli import main
    from prodistill.training.logger import read_metrics

    for k in range(2):
        write_mp4(tmp_path / "videos" / f"v{k}.mkv", _frames(20, 48, 64, tint=5 * k), fps=14, codec="vp9")
    result = CliRunner().invoke(main, [
        "train", "--decoder", "dali", "--device", "cpu", "--data", str(tmp_path / "videos"), "--stage", "1",
        "--max-steps", "2", "--resolution", "32x32", "--frames", "4", "--lora-rank", "2",
        "--disc-head-channels", "8", "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    # H.264 needs NVDEC: refused before any model is built, not a pipeline error at the first batch
    write_mp4(tmp_path / "h264" / "v.mp4", _frames(20, 48, 64), fps=14)
    result = CliRunner().invoke(main, ["train", "--decoder", "dali", "--device", "cpu", "--data",
                                       str(tmp_path / "h264"), "--out", str(tmp_path / "run2")])
    assert result.exit_code != 0 and "--decoder dali on the CPU decodes vp8, vp9, mjpeg only" in result.output
    assert "is h264: use --device cuda (NVDEC), --decoder pyav" in result.output and not (tmp_path / "run2").exists()
