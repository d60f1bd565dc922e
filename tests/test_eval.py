"""`prodistill eval` (prodistill.eval): the Fréchet distance against closed forms, the feature statistics cache,
and the evaluation end to end on the tiny preset with the random-init stand-ins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_lora_run
from prodistill.cli import main
from prodistill.eval.frechet import GaussianStats, frechet_distance, sqrtm_psd


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_sqrtm_psd_squares_back():
    a = _spd(6, 0)
    r = sqrtm_psd(a)
    np.testing.assert_allclose(r @ r, a, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r, r.T)


def test_frechet_distance_matches_closed_forms():
    """Diagonal covariances: ‖Δμ‖² + Σ(√a − √b)². Scaled covariance Σ₂ = c²Σ₁: ‖Δμ‖² + (1 − c)² tr Σ₁."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    got = frechet_distance(GaussianStats(mu1, np.diag(a), 10), GaussianStats(mu2, np.diag(b), 10))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-10)
    s = _spd(7, 2)
    got = frechet_distance(GaussianStats(np.zeros(7), s, 10), GaussianStats(np.ones(7), 9 * s, 10))
    assert got == pytest.approx(7 + (1 - 3) ** 2 * np.trace(s), rel=1e-9)


def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    """Same features: 0 (rank-deficient covariance: 20 samples of 32 features). A mean shift δ in every feature
    adds exactly δ²·D."""
    x = np.random.default_rng(3).standard_normal((20, 32))
    ref = GaussianStats.of(x)
    assert frechet_distance(ref, GaussianStats.of(x)) == pytest.approx(0, abs=1e-8)
    shifted = [frechet_distance(ref, GaussianStats.of(x + d)) for d in (0.1, 0.5, 1.0)]
    np.testing.assert_allclose(shifted, [0.01 * 32, 0.25 * 32, 32], atol=1e-5)  # √ of ~0 eigenvalues: ~1e-7
    noisy = [frechet_distance(ref, GaussianStats.of(x + s * np.random.default_rng(4).standard_normal(x.shape)))
             for s in (0.1, 0.5, 1.0)]
    assert noisy[0] < noisy[1] < noisy[2]


def test_statistics_file_round_trip_and_a_bad_file(tmp_path):
    stats = GaussianStats.of(np.random.default_rng(5).standard_normal((4, 3)), {"extractor": "x", "frames": 4})
    back = GaussianStats.load(stats.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.count == 4 and back.meta == {"extractor": "x", "frames": 4}
    (tmp_path / "bad.npz").write_text("no")
    with pytest.raises(ValueError, match="not a statistics file"):
        GaussianStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats.of(np.zeros((1, 3)))


def _clips():
    from prodistill.data.builtin import ensure_builtin_clips

    return str(ensure_builtin_clips())


def _eval(run, out, *extra):
    return CliRunner().invoke(main, ["eval", "--ckpt", str(run), "--data", _clips(), "--num-videos", "2",
                                     "--teacher-steps", "2", "--device", "cpu", "--out", str(out), *extra])


def test_eval_end_to_end_is_seeded_and_caches_the_real_statistics(tmp_path, one_thread):
    """Student and teacher rows with FVD and both CLIP scores, a real row with the CLIP scores; a side-by-side
    grid (real | teacher | student per row, one row per clip); the same numbers on a second run, which reads
    the real statistics written by the first; statistics of other settings are refused."""
    from prodistill.data.video import probe_video

    _, run = make_lora_run(tmp_path)
    stats = tmp_path / "real.npz"
    first = _eval(run, tmp_path / "a", "--real-stats", str(stats))
    assert first.exit_code == 0, first.output
    assert "real-set statistics saved" in first.output and stats.is_file()
    assert "random-init stand-in" in first.output and "FVD" in first.output
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(a["rows"]) == {"real", "student", "teacher"} and "fvd" not in a["rows"]["real"]
    for name in ("student", "teacher"):
        row = a["rows"][name]
        assert row["fvd"] > 0 and -1 <= row["clip_image_similarity"] <= 1 and -1 <= row["temporal_consistency"] <= 1
    info = probe_video(tmp_path / "a" / "grid.mp4")
    assert (info.num_frames, info.width, info.height) == (4, 3 * 32, 2 * 32)
    second = _eval(run, tmp_path / "b", "--real-stats", str(stats))
    assert second.exit_code == 0, second.output and "saved" not in second.output
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert b["rows"] == a["rows"]
    other = _eval(run, tmp_path / "c", "--real-stats", str(stats), "--seed", "1")
    assert other.exit_code != 0 and "other settings (seed" in other.output and "Traceback" not in other.output


@pytest.mark.parametrize("extra, message", [
    (["--i3d", "/nonexistent/i3d.pt"], "--i3d /nonexistent/i3d.pt: no such file"),
    (["--clip", "/nonexistent/clip"], "--clip /nonexistent/clip: not a transformers model folder"),
    (["--num-videos", "1"], "--num-videos"),
    (["--out", "FILE"], "is a file, not a folder; choose another --out"),
    (["--out", "FILE/eval"], "is a file, not a folder; choose another --out"),
    (["--real-stats", "DIR"], "is a folder, not a file; choose a file path for --real-stats"),
    (["--real-stats", "FILE/s.npz"], "is a file, not a folder; choose another --real-stats"),
    (["--cfg", "nan"], "Invalid value for '--cfg': nan is not a finite number"),
])
def test_bad_eval_input_is_one_sentence_before_any_model(tmp_path, extra, message, monkeypatch):
    import prodistill.sampling

    monkeypatch.setattr(prodistill.sampling, "load_run", lambda *a, **k: pytest.fail("models were built"))
    _, run = make_lora_run(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    extra = [a.replace("FILE", str(tmp_path / "file")).replace("DIR", str(tmp_path / "dir")) for a in extra]
    result = _eval(run, tmp_path / "o", *extra)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage, message", [("ema", "has no ema weights (EMA exists in stage 2 only)"),
                                             ("truncate", "student.safetensors is damaged")])
def test_a_checkpoint_without_the_weights_is_refused_before_any_model(tmp_path, damage, message, monkeypatch):
    import prodistill.training.run

    _, run = make_lora_run(tmp_path)  # stage 1: no EMA
    if damage == "truncate":
        weights = next((run / "stage1").glob("ckpt-*")) / "student.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr(prodistill.training.run, "build_models", lambda *a, **k: pytest.fail("models were built"))
    result = _eval(run, tmp_path / "o", *(["--weights", "ema"] if damage == "ema" else []))
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_a_failed_statistics_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """The statistics are written beside the file and renamed: a save that fails half-way leaves the old file whole
    and no temporary file behind."""
    old = GaussianStats.of(np.random.default_rng(6).standard_normal((4, 3)), {"seed": 0})
    path = old.save(tmp_path / "real.npz")

    def fail(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        GaussianStats.of(np.zeros((4, 3)) + 1, {"seed": 1}).save(path)
    assert GaussianStats.load(path).meta == {"seed": 0} and [p.name for p in tmp_path.iterdir()] == ["real.npz"]


def test_real_i3d_file_is_called_the_standard_way(tmp_path):
    """A TorchScript file given as --i3d is called as FVD's I3D is: (B, 3, T, 224, 224) in [−1, 1], rescale and
    resize off, features returned."""
    from prodistill.eval.features import load_video_features

    class Fake(torch.nn.Module):
        def forward(self, x, rescale: bool = True, resize: bool = True, return_features: bool = False):
            assert not rescale and not resize and return_features
            return torch.stack([x.mean(dim=(1, 2, 3, 4)), torch.tensor(float(x.shape[2])).expand(x.shape[0]),
                                torch.tensor(float(x.shape[-1])).expand(x.shape[0])], dim=1)

    torch.jit.script(Fake()).save(str(tmp_path / "i3d.pt"))
    net = load_video_features(tmp_path / "i3d.pt", torch.device("cpu"))
    assert net.standard and net.size == 224
    feats = net(torch.zeros(2, 5, 3, 32, 48))
    np.testing.assert_allclose(feats, [[0, 5, 224], [0, 5, 224]])


# -- validation during training ------------------------------------------------------------------------------------
TINY = ["--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--lora-rank", "2", "--disc-head-channels", "8",
        "--num-timesteps", "10", "--solver-steps", "2", "--device", "cpu", "--sample-every", "0"]


def test_validation_during_training_logs_metrics_and_marks_the_best_checkpoint(tmp_path, one_thread):
    """OSV stage 2 for 3 steps, validating every step on 2 held-out clips, checkpoints every 2 steps keeping 1:
    val/* rows at steps 1-3, a checkpoint written for each validation step, best.json naming the checkpoint with
    the lowest FVD, which holds the BEST marker and survives pruning; validating the same weights twice gives the
    same numbers."""
    from prodistill.training.logger import read_metrics

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(run), "--stage", "2", "--max-steps", "3",
                                       "--ckpt-every", "2", "--keep-ckpts", "1", "--val-data", _clips(),
                                       "--val-every", "1", "--val-videos", "2", *TINY])
    assert result.exit_code == 0, result.output
    rows = [r for r in read_metrics(run) if "val/fvd" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["val/fvd"] >= 0 and -1 <= r["val/clip_image_similarity"] <= 1 for r in rows)
    best = json.loads((run / "val" / "best.json").read_text())
    fvds = {r["step"]: r["val/fvd"] for r in rows}
    assert best["step"] == min(fvds, key=fvds.get) and best["fvd"] == pytest.approx(min(fvds.values()))
    kept = sorted(p.name for p in (run / "stage2").glob("ckpt-*"))
    assert f"ckpt-{best['step']:07d}" in kept and "ckpt-0000003" in kept
    assert [p.parent.name for p in (run / "stage2").glob("ckpt-*/BEST")] == [f"ckpt-{best['step']:07d}"]
    assert (run / "val" / "real-stats.npz").is_file()


def test_a_validation_is_reproducible(tmp_path, one_thread):
    from conftest import make_trainer, tiny_config
    from prodistill.data.dataset import list_videos
    from prodistill.eval.validate import Validator

    cfg = tiny_config(tmp_path, frames=4, val_data=_clips(), val_videos=2)
    _, method, models = make_trainer(cfg, tmp_path / "run", stage=2)
    validator = Validator(cfg, models, tmp_path / "run", list_videos(cfg.val_data))
    assert validator(method) == validator(method)


@pytest.mark.parametrize("args, message", [
    (["--val-every", "2"], "--val-every needs --val-data"),
    (["--val-data", "/nonexistent/held-out"], "--val-data /nonexistent/held-out"),
    (["--val-data", "CLIPS", "--val-i3d", "/nonexistent/i3d.pt"], "--val-i3d /nonexistent/i3d.pt: no such file"),
])
def test_bad_validation_input_is_one_sentence(tmp_path, args, message, monkeypatch):
    import prodistill.training.run

    monkeypatch.setattr(prodistill.training.run, "build_models", lambda *a, **k: pytest.fail("models were built"))
    args = [_clips() if a == "CLIPS" else a for a in args]
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), *TINY, *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
