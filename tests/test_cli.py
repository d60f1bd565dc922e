"""The CLI end to end on the tiny preset: train (both stages, built-in clips through PyAV) → resume → sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prodistill.cli import main
from prodistill.data.video import probe_video
from prodistill.training.logger import read_metrics

TINY = ["--preset", "tiny", "--resolution", "32x32", "--lora-rank", "2", "--disc-head-channels", "8",
        "--num-timesteps", "10", "--solver-steps", "2", "--device", "cpu"]


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = _run(["train", "--method", "osv", "--out", str(run), "--max-steps", "2", *TINY])
    assert result.exit_code == 0, result.output
    return run


def test_train_writes_config_metrics_checkpoints_and_previews(trained):
    assert (trained / "config.yaml").is_file()
    rows = read_metrics(trained)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for key in ("loss/g_adv", "loss/distance", "loss/d", "d/logits_real", "d/logits_fake",
                "grad_norm/generator", "grad_norm/discriminator", "perf/sec_per_step"):
        assert key in rows[-1]
    for stage, groups in ((1, {"student", "discriminator"}), (2, {"student", "discriminator", "ema"})):
        ckpt = trained / f"stage{stage}" / "ckpt-0000002"
        assert {p.stem for p in ckpt.glob("*.safetensors")} == groups
        assert json.loads((ckpt / "meta.json").read_text())["complete"] is True
    previews = sorted((trained / "samples").glob("*.mp4"))
    assert [p.name for p in previews] == ["stage1-step0000002.mp4", "stage2-step0000002.mp4"]
    assert probe_video(previews[0]).num_frames == 14


def test_rerun_without_resume_is_refused_and_resume_extends(trained, tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(trained), "--max-steps", "2", *TINY])
    assert result.exit_code != 0 and "--resume" in result.output
    extended = _run(["train", "--out", str(trained), "--resume", "--max-steps", "3", "--stage", "2"])
    assert extended.exit_code == 0, extended.output
    assert (trained / "stage2" / "ckpt-0000003" / "ema.safetensors").is_file()


@pytest.mark.parametrize("args", [["--steps", "1", "--tts"], ["--steps", "2"], ["--teacher-steps", "3", "--cfg", "2"]])
def test_sample_writes_a_playable_h264_mp4(trained, tmp_path, args):
    image = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out.mp4"
    result = _run(["sample", "--ckpt", str(trained), "--image", str(image), "--out", str(out),
                   "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height) == (14, 32, 32)
    import av

    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"


@pytest.mark.parametrize("args, message", [
    (["--resolution", "30x32"], "multiples of 16"),
    (["--teacher", "/nonexistent/svd"], "--teacher"),
    (["--data", "/nonexistent/videos"], "--data"),
    (["--device", "cuda"], "CUDA"),
])
def test_bad_input_is_one_clear_sentence(tmp_path, args, message, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), *TINY[:-2], *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r" / "stage1").exists()


def test_missing_optional_packages_are_reported_before_models_are_built(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--tensorboard", *TINY])
    assert result.exit_code != 0 and "pip install 'prodistill[tensorboard]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_decoder_dali_without_dali_is_one_sentence(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali → ImportError
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--decoder", "dali", *TINY])
    assert result.exit_code != 0 and "pip install 'prodistill[dali]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_lcm_train_then_sample(tmp_path):
    run = tmp_path / "lcm"
    result = _run(["train", "--method", "lcm", "--out", str(run), "--max-steps", "1", *TINY])
    assert result.exit_code == 0, result.output
    assert {p.stem for p in (run / "stage2" / "ckpt-0000001").glob("*.safetensors")} == {"student", "ema"}
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "l.mp4"
    result = _run(["sample", "--ckpt", str(run), "--image", str(image), "--out", str(out), "--weights", "ema",
                   "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert probe_video(out).num_frames == 14


def test_a_loaded_run_samples_with_the_exact_rewrite_and_the_same_denoiser(trained):
    """`prodistill sample` / `eval` networks carry the single-key attention rewrite, and denoise exactly as the
    unrewritten student does."""
    import torch

    from prodistill.accel.rewrites import SingleKeyAttnProcessor, apply_rewrites
    from prodistill.models.svd import SVDCondition, edm_denoise
    from prodistill.sampling import load_run

    run = load_run(trained, device="cpu")
    for net in (run.student, run.models.unet):
        assert all(isinstance(p, SingleKeyAttnProcessor) for p in net.attn_processors.values())
    g = torch.Generator().manual_seed(0)
    x, latents = torch.randn(1, 4, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g)
    cond = SVDCondition(torch.randn(1, 1, 32, generator=g), latents, torch.tensor([[6.0, 127.0, 0.02]]))
    with torch.no_grad():
        got = edm_denoise(run.student, x, torch.tensor([2.0]), cond)
        apply_rewrites([run.student], on=False)
        want = edm_denoise(run.student, x, torch.tensor([2.0]), cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_train_help_names_the_defaults_a_preset_or_method_puts_in_place():
    """The paper's defaults are written on each option, and so are those a preset or method applies instead (the
    tiny preset, the CLI's default, trains 60 + 120 steps at lr 1e-4, not the paper's 2K + 20K at 5e-6)."""
    text = " ".join(CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output.split())
    assert "[default: 2000; with --preset tiny: 60]" in text and "with --method avdm2: 4e-06; with --preset tiny: 0.0001]" in text


def _forbid_models(monkeypatch):
    """From here on, building a model fails the test: bad input must be refused before."""
    import prodistill.training.run

    monkeypatch.setattr(prodistill.training.run, "build_models", lambda *a, **k: pytest.fail("models were built"))


@pytest.mark.parametrize("args, message", [
    (["--out", "FILE/x.mp4"], "is a file, not a folder; choose another --out"),
    (["--out", "DIR"], "give a file path ending in .mp4"),
    (["--out", "x.txt"], "--out x.txt: give a file path ending in .mp4"),
    (["--cfg", "nan"], "Invalid value for '--cfg': nan is not a finite number"),
    (["--teacher-steps", "2", "--cfg", "inf"], "Invalid value for '--cfg': inf is not a finite number"),
    (["--weights", "ema"], "has no ema weights (EMA exists in stage 2 only): use --weights student"),
    (["--image", "BOMB"], "is too large (over 200 pixels): resize it"),
    (["--image", "NOTIMAGE"], "could not read image"),
])
def test_bad_sample_input_is_one_sentence_before_any_model(tmp_path, args, message, monkeypatch):
    """Output paths, guidance, weights and the image are checked before the models are built (they were found
    wrong only after sampling, or as tracebacks); PIL's decompression-bomb guard is a sentence too."""
    from conftest import make_lora_run

    _, run = make_lora_run(tmp_path)  # a stage-1 checkpoint: no EMA
    _forbid_models(monkeypatch)
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "notimage.png").write_text("not a PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is over twice that: refused as a bomb
    names = {"FILE/x.mp4": str(tmp_path / "file" / "x.mp4"), "DIR": str(tmp_path / "dir"), "BOMB": str(image),
             "NOTIMAGE": str(tmp_path / "notimage.png")}
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(run), "--image", str(image), "--device", "cpu",
                                       "--out", str(tmp_path / "o.mp4"), *[names.get(a, a) for a in args]])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.mp4").exists()


def test_a_truncated_checkpoint_file_is_one_sentence_naming_it(tmp_path, monkeypatch):
    from conftest import make_lora_run

    _, run = make_lora_run(tmp_path)
    _forbid_models(monkeypatch)
    weights = next((run / "stage1").glob("ckpt-*")) / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(run), "--image", str(image), "--device", "cpu",
                                       "--out", str(tmp_path / "o.mp4")])
    assert result.exit_code != 0 and f"the checkpoint file {weights} is damaged" in result.output, result.output
    assert "Traceback" not in result.output and "SafetensorError" not in result.output
