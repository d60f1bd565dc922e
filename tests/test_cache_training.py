"""Training from the latent cache gives the same losses as training from the videos (same seed, epoch 0)."""

import pytest
from click.testing import CliRunner

from prodistill.cli import main
from prodistill.training.logger import read_metrics

COMMON = ["--resolution", "32x32", "--frames", "4", "--device", "cpu"]
TRAIN = ["train", "--max-steps", "2", "--lora-rank", "2", "--disc-head-channels", "8", "--num-timesteps", "10",
         "--solver-steps", "2", *COMMON]


def _losses(run):
    return [(r["stage"], r["step"], r["loss/g_total"], r["loss/d"]) for r in read_metrics(run)]


def test_cache_and_video_training_match(tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    assert runner.invoke(main, ["data", "cache", "--out", str(cache), *COMMON], catch_exceptions=False).exit_code == 0
    for name, extra in (("videos", []), ("cached", ["--data", str(cache)])):
        result = runner.invoke(main, [*TRAIN, "--out", str(tmp_path / name), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    videos, cached = _losses(tmp_path / "videos"), _losses(tmp_path / "cached")
    assert len(videos) == 4 and [r[:2] for r in cached] == [r[:2] for r in videos]
    # the encoders ran in other batch compositions, so equality holds up to float rounding
    for a, b in zip(cached, videos):
        assert a[2:] == pytest.approx(b[2:], rel=1e-5)


def test_cache_with_other_settings_is_refused_before_training(tmp_path):
    cache = tmp_path / "cache"
    assert CliRunner().invoke(main, ["data", "cache", "--out", str(cache), *COMMON]).exit_code == 0
    result = CliRunner().invoke(main, [*TRAIN, "--frames", "6", "--out", str(tmp_path / "r"), "--data", str(cache)])
    assert result.exit_code != 0 and "frames" in result.output
    assert not (tmp_path / "r").exists()


def _forbid_models(monkeypatch):
    import prodistill.training.run

    monkeypatch.setattr(prodistill.training.run, "build_models", lambda *a, **k: pytest.fail("models were built"))


def test_cache_out_that_cannot_be_a_folder_is_refused_before_any_model(tmp_path, monkeypatch):
    _forbid_models(monkeypatch)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "cache"):
        result = CliRunner().invoke(main, ["data", "cache", "--out", str(out), *COMMON])
        assert result.exit_code != 0 and "is a file, not a folder; choose another --out" in result.output
        assert "Traceback" not in result.output


def test_undecodable_videos_are_counted_and_none_decoded_is_an_error(tmp_path):
    """One corrupt file among good ones: counted as skipped, not as cached. Only corrupt files: one sentence and no
    cache left for `train --data` to take (it used to say "cached 1 videos" and leave an empty, complete cache)."""
    import json
    import shutil

    from prodistill.data.builtin import ensure_builtin_clips

    bad, mixed = tmp_path / "bad", tmp_path / "mixed"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"not a video" * 100)
    shutil.copytree(bad, mixed)
    shutil.copy(sorted(ensure_builtin_clips().glob("*.mp4"))[0], mixed / "b.mp4")
    result = CliRunner().invoke(main, ["data", "cache", "--data", str(bad), "--out", str(tmp_path / "c1"), *COMMON])
    assert result.exit_code != 0 and "none of its 1 video(s) could be decoded" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "c1").exists()
    result = CliRunner().invoke(main, ["data", "cache", "--data", str(mixed), "--out", str(tmp_path / "c2"), *COMMON])
    assert result.exit_code == 0, result.output
    assert f"cached 1 of 2 videos in {tmp_path / 'c2'}; 1 could not be decoded" in result.output
    meta = json.loads((tmp_path / "c2" / "cache.json").read_text())
    assert (meta["cached"], meta["skipped"]) == (1, [str(mixed / "a.mp4")])


def test_a_cache_without_clips_is_refused(tmp_path):
    from prodistill.data.cache import LatentCacheDataset
    from prodistill.data.dataset import DataError

    (tmp_path / "cache.json").write_text('{"complete": true, "shards": [], "skipped": ["a.mp4"]}')
    with pytest.raises(DataError, match="without a single clip"):
        LatentCacheDataset(tmp_path)
