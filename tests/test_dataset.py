"""The CPU video path: PyAV round trip, built-in clips, clip sampling, bad files, sharding and resume."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch

from prodistill.data.builtin import ensure_builtin_clips
from prodistill.data.dataset import (ClipLoader, DataError, VideoClipDataset, clip_indices, cover_crop,
                                     list_videos)
from prodistill.data.video import probe_video, read_frames, write_mp4


def _levels(num_frames: int, step: int = 8, size=(32, 48)) -> np.ndarray:
    """Frame k is a flat gray of level step·k: decoding tells which source frame we got."""
    return np.stack([np.full((*size, 3), step * k, np.uint8) for k in range(num_frames)])


def test_the_same_frames_encode_to_the_same_file(tmp_path):
    """H.264 output is a function of the frames: x264's macroblock tree gave 39 distinct files of 40 writes of
    this built-in clip (PyAV 18.1.1), so built-in clips differed between builds and runs compared unequal."""
    from export.runtime.pipeline import write_mp4 as runtime_write_mp4
    from prodistill.data.builtin import _CLIPS, _render

    frames = _render(_CLIPS[2])
    written = {write_mp4(tmp_path / f"{k}.mp4", frames, fps=7).read_bytes() for k in range(4)}
    assert len(written) == 1
    served = {runtime_write_mp4(tmp_path / f"r{k}.mp4", frames, 7.0).read_bytes() for k in range(4)}
    assert len(served) == 1


def _decode_into(queue, path):
    queue.put(read_frames(path, [0, 3]))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_decoding_in_a_forked_worker_after_the_parent_decoded(tmp_path):
    """A DataLoader worker forked after the parent decoded a clip (the parent's loader with 0 workers, a preview)
    decodes too: with PyAV 18's threaded colour conversion it waited forever there (the test then fails at the
    join's limit instead of hanging)."""
    path = write_mp4(tmp_path / "a.mp4", _levels(6), fps=7)
    want = read_frames(path, [0, 3])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_into, args=(queue, path))
    child.start()
    child.join(60)
    hung = child.is_alive()
    child.kill()
    assert not hung, "decoding in the forked child did not finish within 60 s"
    np.testing.assert_array_equal(queue.get(timeout=10), want)


def test_h264_round_trip(tmp_path):
    yy, xx = np.mgrid[0:64, 0:96]
    smooth = np.stack([(xx * 2 + yy + 10 * k) % 256 for k in range(6)]).astype(np.uint8)
    frames = np.repeat(smooth[..., None], 3, axis=-1)
    path = write_mp4(tmp_path / "a.mp4", frames, fps=12)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (6, 12.0, 96, 64)
    got = read_frames(path, [0, 5, 2])
    assert got.shape == (3, 64, 96, 3)
    assert np.abs(got.astype(float) - frames[[0, 5, 2]]).mean() < 8
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "odd.mp4", frames[:, :63], fps=12)


def test_builtin_clips_are_real_moving_video_built_once():
    root = ensure_builtin_clips()
    files = sorted(root.glob("*.mp4"))
    assert len(files) == 8
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert ensure_builtin_clips() == root and [f.stat().st_mtime_ns for f in files] == mtimes
    for f in files:
        frames = read_frames(f, [0, 31]).astype(float)
        assert frames.std() > 20  # a photograph, not a flat field
        # it moves: ≥ 2 % of the pixels change by more than 30 levels between the first and the last frame (the
        # clip with the least motion, a small disc moving over a still photograph, has 2.8 %)
        assert (np.abs(frames[1] - frames[0]).max(axis=-1) > 30).mean() > 0.02


def test_clip_indices_resample_fps():
    rng = np.random.default_rng(0)
    idx = clip_indices(100, 28.0, 7.0, 5, rng)
    assert np.diff(idx).tolist() == [4, 4, 4, 4]
    short = clip_indices(10, 28.0, 7.0, 5, rng)  # too short at stride 4: consecutive frames instead
    assert np.diff(short).tolist() == [1, 1, 1, 1] and short[-1] <= 9
    assert clip_indices(4, 28.0, 7.0, 5, rng) is None


def test_dataset_samples_at_target_fps_from_decoded_levels(tmp_path):
    write_mp4(tmp_path / "levels.mp4", _levels(30), fps=28)
    ds = VideoClipDataset([tmp_path / "levels.mp4"], num_frames=4, fps=7.0, resolution=(16, 16), seed=3)
    clip = ds[0]["pixels"]
    assert clip.shape == (4, 3, 16, 16) and clip.min() >= -1 and clip.max() <= 1
    levels = ((clip.mean(dim=(1, 2, 3)) + 1) * 127.5 / 8).round().tolist()
    assert np.diff(levels).tolist() == [4, 4, 4]  # every 4th source frame: 28 → 7 fps
    assert torch.equal(ds[0]["pixels"], clip)  # deterministic for (seed, epoch, idx)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        starts.add(round(float((ds[0]["pixels"][0].mean() + 1) * 127.5 / 8)))
    assert len(starts) > 1  # a new random start per epoch


def test_bad_files_are_skipped_counted_and_warned(tmp_path):
    write_mp4(tmp_path / "good.mp4", _levels(20), fps=7)
    write_mp4(tmp_path / "short.mp4", _levels(3), fps=7)
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    files = list_videos(tmp_path)
    assert [f.path.name for f in files] == ["corrupt.mp4", "good.mp4", "short.mp4"]
    ds = VideoClipDataset(files, num_frames=4, fps=7.0, resolution=(16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [ds[i]["index"] for i in range(3)]
    assert got == [1, 1, 1] and ds.skipped == 2
    assert {p.name for p in ds.bad} == {"corrupt.mp4", "short.mp4"}
    assert len(caught) == 2
    with pytest.raises(DataError), pytest.warns(UserWarning, match="corrupt.mp4"):
        VideoClipDataset([tmp_path / "corrupt.mp4"], num_frames=4, resolution=(16, 16))[0]


def test_list_videos_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder or a manifest"):
        list_videos(tmp_path / "missing")
    with pytest.raises(DataError, match="no video files"):
        list_videos(tmp_path)


def _loader_items(rank, world, n=8, batches=None, num_workers=0, tmp_path=None):
    ds = _IndexOnly(n)
    loader = ClipLoader(ds, batch_size=1, seed=5, rank=rank, world_size=world, num_workers=num_workers)
    return loader, [int(next(loader)["pixels"][0]) for _ in range(batches or n // world)]


class _IndexOnly(VideoClipDataset):
    def __init__(self, n):
        super().__init__([f"v{i}" for i in range(n)])

    def load(self, idx):
        return torch.tensor(idx)


def test_ranks_are_disjoint_and_complete_per_epoch():
    shares = [_loader_items(r, 3, n=9)[1] for r in range(3)]
    flat = sorted(i for s in shares for i in s)
    assert flat == list(range(9))


def test_loader_resume_continues_exactly():
    loader, straight = _loader_items(0, 1, n=5, batches=12)
    fresh, _ = _loader_items(0, 1, n=5, batches=7)
    resumed = ClipLoader(_IndexOnly(5), batch_size=1, seed=5)
    resumed.load_state_dict(fresh.state_dict())
    assert [int(next(resumed)["pixels"][0]) for _ in range(5)] == straight[7:]
    assert sorted(straight[:5]) == list(range(5)) and straight[:5] != straight[5:10]  # reshuffled per epoch


def test_loader_workers_match_in_process(tmp_path):
    _, inline = _loader_items(0, 1, n=6, batches=8)
    _, workers = _loader_items(0, 1, n=6, batches=8, num_workers=2)
    assert workers == inline


def test_cover_crop_keeps_aspect_and_centre():
    x = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8)
    assert cover_crop(x, 4, 4).shape == (1, 1, 4, 4)
    assert torch.equal(cover_crop(x, 4, 4)[0, 0], x[0, 0, :, 2:6])


def test_manifest_csv_openvid_layout_and_jsonl(tmp_path):
    write_mp4(tmp_path / "clips" / "a.mp4", _levels(20), fps=28)
    write_mp4(tmp_path / "clips" / "b.mp4", _levels(20), fps=28)
    (tmp_path / "openvid.csv").write_text(
        "video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"
        "a.mp4,a cat,5.1,1.0,0.9,static,20,28.0,0.7\n"
        "gone.mp4,missing,5,1,1,static,20,28.0,0.7\n"
        "b.mp4,\"a dog, running\",5.2,1.2,0.95,pan,20,28.0,0.7\n")
    with pytest.warns(UserWarning, match="1 of 3 rows"):
        entries = list_videos(tmp_path / "openvid.csv", video_root=tmp_path / "clips")
    assert [(e.path.name, e.caption, e.fps, e.num_frames) for e in entries] == [
        ("a.mp4", "a cat", 28.0, 20), ("b.mp4", "a dog, running", 28.0, 20)]
    (tmp_path / "m.jsonl").write_text('{"path": "clips/a.mp4"}\n\n{"path": "%s"}\n' % (tmp_path / "clips" / "b.mp4"))
    assert [e.path.name for e in list_videos(tmp_path / "m.jsonl")] == ["a.mp4", "b.mp4"]
    ds = VideoClipDataset(entries, num_frames=4, fps=7.0, resolution=(16, 16))
    assert ds[0]["pixels"].shape == (4, 3, 16, 16)


def test_manifest_errors(tmp_path):
    (tmp_path / "none.csv").write_text("video\nx.mp4\n")
    with pytest.raises(DataError, match="none of its 1 rows"):
        list_videos(tmp_path / "none.csv")
    (tmp_path / "nopath.csv").write_text("caption\nhello\n")
    with pytest.raises(DataError, match="no video path"):
        list_videos(tmp_path / "nopath.csv")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list_videos(tmp_path / "bad.jsonl")


def test_loader_counts_skips_across_workers_and_restores_them(tmp_path):
    write_mp4(tmp_path / "good.mp4", _levels(20), fps=7)
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    for workers in (0, 1):
        ds = VideoClipDataset(list_videos(tmp_path), num_frames=4, fps=7.0, resolution=(16, 16))
        loader = ClipLoader(ds, batch_size=2, num_workers=workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            next(loader)
        assert loader.stats() == {"data/skipped": 1.0}
    fresh = ClipLoader(VideoClipDataset(list_videos(tmp_path), num_frames=4, resolution=(16, 16)), batch_size=1)
    fresh.load_state_dict(loader.state_dict())
    assert fresh.stats() == {"data/skipped": 1.0} and {p.name for p in fresh.dataset.bad} == {"corrupt.mp4"}


def test_latent_cache_round_trip_and_resume(tmp_path):
    from click.testing import CliRunner

    from prodistill.cli import main
    from prodistill.data.cache import LatentCacheDataset

    args = ["data", "cache", "--out", str(tmp_path / "cache"), "--resolution", "32x32", "--frames", "4",
            "--device", "cpu", "--shard-size", "3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    from prodistill.atomic import umask_mode

    assert all(p.stat().st_mode & 0o777 == umask_mode(0o666) for p in (*shards, tmp_path / "cache" / "cache.json"))
    ds = LatentCacheDataset(tmp_path / "cache")
    assert len(ds) == 8
    item = ds[7]
    assert item["latent_mean"].shape == (4, 4, 4, 4) and item["image_embeds"].shape == (1, 32)
    # an interrupted build resumes: a missing shard is rebuilt, the others are left alone
    mtime = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    assert shards[1].is_file() and shards[0].stat().st_mtime_ns == mtime
    assert torch.equal(LatentCacheDataset(tmp_path / "cache")[4]["latent_mean"], ds[4]["latent_mean"])
    other = CliRunner().invoke(main, [*args[:-2], "--frames", "6", "--shard-size", "3"])
    assert other.exit_code != 0 and "other settings" in other.output
