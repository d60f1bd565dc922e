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
