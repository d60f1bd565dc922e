"""The torch-free runtime against the torch code it replaces, on the tiny export (`exported` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_image_preprocessing_matches_torch(image):
    from export.runtime.image import clip_pixels, load_image, to_uint8_frames
    from prodistill.models.svd import CLIP_MEAN, CLIP_STD
    from prodistill.sampling import load_image as torch_load_image
    from prodistill.sampling import to_uint8_frames as torch_to_uint8

    ours, ref = load_image(image, 32, 32), torch_load_image(image, 32, 32)
    assert ours.shape == (1, 3, 32, 32) and np.abs(ours - ref.numpy()).max() < 1e-5
    x = F.interpolate(ref, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    ref_clip = ((x + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert np.abs(clip_pixels(ours, 224, CLIP_MEAN, CLIP_STD) - ref_clip.numpy()).max() < 1e-4
    frames = np.random.default_rng(1).uniform(-1.2, 1.2, (2, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(to_uint8_frames(frames), torch_to_uint8(torch.from_numpy(frames)))


def test_numpy_samplers_match_the_torch_samplers():
    """1-step consistency and TTS (OSV eq. 13) in numpy vs prodistill.diffusion.samplers, same denoiser."""
    from export.runtime.sampler import one_step, time_travel
    from prodistill.diffusion.samplers import consistency_sample, time_travel_sample
    from prodistill.sampling import student_sigmas

    sigmas, sigmas_next = student_sigmas(1, 100)
    noise = np.random.default_rng(0).standard_normal((1, 4, 4, 4, 4)).astype(np.float32)
    weights = np.linspace(-1, 1, noise.size, dtype=np.float32).reshape(noise.shape)
    denoise_np = lambda x, s: np.tanh(x / np.float32(s)) + weights / np.float32(1 + s)  # noqa: E731
    denoise_torch = lambda x, s: torch.from_numpy(denoise_np(x.numpy(), float(s[0])))  # noqa: E731
    ref_one = consistency_sample(denoise_torch, torch.from_numpy(noise), sigmas)
    ref_tts = time_travel_sample(denoise_torch, torch.from_numpy(noise), sigmas, sigmas_next)
    got_one = one_step(denoise_np, noise, float(sigmas[0]), 0.002)
    got_tts = time_travel(denoise_np, noise, float(sigmas[0]), float(sigmas_next[1]), 0.002)
    assert np.abs(got_one - ref_one.numpy()).max() < 1e-5
    assert np.abs(got_tts - ref_tts.numpy()).max() < 1e-5
    assert np.abs(got_tts - got_one).max() > 1e-2  # TTS is a different sampler, so the check above can fail
    from prodistill.diffusion.consistency import ConsistencyParam

    param = ConsistencyParam(sigma_data=0.5, scale=10.0)  # --cm-sigma-data 0.5 --cm-scale 10, as a manifest holds
    ref_one = consistency_sample(denoise_torch, torch.from_numpy(noise), sigmas, param=param)
    ref_tts = time_travel_sample(denoise_torch, torch.from_numpy(noise), sigmas, sigmas_next, param)
    got_one = one_step(denoise_np, noise, float(sigmas[0]), 0.002, (0.5, 10.0))
    got_tts = time_travel(denoise_np, noise, float(sigmas[0]), float(sigmas_next[1]), 0.002, (0.5, 10.0))
    assert np.abs(got_one - ref_one.numpy()).max() < 1e-5
    assert np.abs(got_tts - ref_tts.numpy()).max() < 1e-5


@pytest.mark.parametrize("tts", [False, True])
def test_runtime_matches_prodistill_sample_on_the_same_noise(exported, image, tts):
    """The ORT runtime vs `prodistill sample`'s functions (`SVDModels.condition`, `sample_student` on the
    unmerged student, `SVDModels.decode`) on the same checkpoint, image and noise: pixels within 1e-4."""
    from export.runtime.image import load_image, to_uint8_frames
    from export.runtime.pipeline import Noise, OneStepPipeline
    from prodistill.diffusion.solvers import bind
    from prodistill.models.student import load_trainable
    from prodistill.sampling import load_image as torch_load_image
    from prodistill.sampling import sample_student, to_uint8_frames as torch_to_uint8
    from prodistill.training.checkpoint import load_weights
    from prodistill.training.run import build_models

    cfg, run, engines, _ = exported
    pipeline = OneStepPipeline(engines, "ort", "cpu")
    noise = Noise.draw(pipeline.manifest, seed=3)
    got = pipeline.generate_pixels(load_image(image, 32, 32), noise, tts=tts)

    models = build_models(cfg, torch.device("cpu"))
    student = models.make_student(cfg, stage=1)
    load_trainable(student, load_weights(run / "stage1" / "ckpt-0000001")["student"])
    cond = models.condition(torch_load_image(image, 32, 32), cfg.frames, cfg.fps,
                            noise=torch.from_numpy(noise.augmentation))
    latents = sample_student(bind(models.denoiser(student.eval()), cond), (1, 4, 4, 4, 4), 1, tts, cfg.num_timesteps,
                             None, torch.device("cpu"), noise=torch.from_numpy(noise.latents))
    ref = models.decode(latents).numpy()
    assert got.shape == ref.shape == (1, 4, 3, 32, 32)
    assert np.abs(got - ref).max() < 1e-4 and ref.std() > 0.01
    diff = to_uint8_frames(got[0]).astype(int) - torch_to_uint8(torch.from_numpy(ref[0])).astype(int)
    assert np.abs(diff).max() <= 1


def test_generate_runs_without_torch(exported, image, tmp_path):
    """`prodistill generate` in a fresh interpreter: writes the video and never imports torch."""
    from prodistill.data.video import probe_video

    _, _, engines, _ = exported
    out = tmp_path / "gen.mp4"
    argv = ["prodistill", "generate", "--engines", str(engines), "--image", str(image), "--out", str(out), "--tts",
            "--seed", "1"]
    code = (f"import sys, runpy; sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('prodistill', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "import export.runtime.tensorrt\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "NO-TORCH" and f"wrote {out}" in result.stdout
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height) == (4, 32, 32)


def test_generate_errors_are_one_sentence(tmp_path, image, exported):
    from click.testing import CliRunner

    from export.runtime.cli import generate

    result = CliRunner().invoke(generate, ["--engines", str(tmp_path), "--image", str(image)])
    assert result.exit_code != 0 and "has no manifest.json" in result.output and "Traceback" not in result.output
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = CliRunner().invoke(generate, ["--engines", str(exported[2]), "--image", str(image), "--backend", "trt"])
        assert result.exit_code != 0 and "Docker image" in result.output and "Traceback" not in result.output


def _drop_width(m: dict) -> None:
    del m["width"]


def _swap_vae_encoder(m: dict) -> None:
    m["graphs"]["vae_encoder"]["inputs"]["image"] = [1, 3, 64, 64]  # as if its graph came from a 64×64 export


@pytest.mark.parametrize("name, damage, message", [
    ("missing graph", lambda e: (e / "denoiser.onnx").unlink(), "has no denoiser.onnx"),
    ("truncated graph", lambda e: (e / "decoder.onnx").write_bytes((e / "decoder.onnx").read_bytes()[:300]),
     "decoder.onnx is damaged"),
    ("manifest without a field", lambda e: _edit_manifest(e, _drop_width), "manifest.json is not a manifest this "
     "runtime can read (no width)"),
    ("manifest not JSON", lambda e: (e / "manifest.json").write_text("{not json"), "manifest.json is not valid JSON"),
    ("graphs of two exports", lambda e: _edit_manifest(e, _swap_vae_encoder), "the folder mixes two exports"),
])
def test_a_broken_engines_folder_is_one_sentence_naming_the_file(exported, image, tmp_path, name, damage, message):
    import shutil

    from click.testing import CliRunner

    from export.runtime.cli import generate

    engines = tmp_path / "engines"
    shutil.copytree(exported[2], engines)
    damage(engines)
    result = CliRunner().invoke(generate, ["--engines", str(engines), "--image", str(image),
                                           "--out", str(tmp_path / "out.mp4")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (name, result.output)
    assert message in result.output and "export the folder again" in result.output, (name, result.output)
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.mp4").exists()


def _edit_manifest(engines: Path, edit) -> None:
    manifest = json.loads((engines / "manifest.json").read_text())
    edit(manifest)
    (engines / "manifest.json").write_text(json.dumps(manifest))


def bomb_png(width: int = 20_000, height: int = 10_000) -> bytes:
    """A PNG whose header declares more pixels than Pillow opens at all (twice its MAX_IMAGE_PIXELS, ≈179 M), with
    no pixel data: Image.open refuses it from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_over_pillows_bomb_limit_is_too_large_not_undecodable(exported, tmp_path):
    """A valid PNG above Pillow's decompression-bomb limit is the too-large answer (send a smaller image), as an
    image over --max-pixels is, not "could not read image"."""
    import io

    from click.testing import CliRunner

    from export.runtime.cli import generate
    from export.runtime.image import ImageTooLarge, load_image

    for max_pixels in (None, 4096):
        with pytest.raises(ImageTooLarge, match="send a smaller image"):
            load_image(io.BytesIO(bomb_png()), 32, 32, max_pixels)
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    result = CliRunner().invoke(generate, ["--engines", str(exported[2]), "--image", str(tmp_path / "bomb.png"),
                                           "--out", str(tmp_path / "out.mp4")])
    assert result.exit_code != 0 and "more than Pillow decodes: send a smaller image" in result.output, result.output


def test_tensorrt_engines_match_onnxruntime(exported, image, tmp_path):
    """Where TensorRT is installed (the Docker image): engines built from the export agree with ORT."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (the Docker image has it)")
    import shutil

    from export.run import build_engines
    from export.runtime.image import load_image
    from export.runtime.manifest import Manifest
    from export.runtime.pipeline import Noise, OneStepPipeline

    engines = tmp_path / "engines"
    shutil.copytree(exported[2], engines)
    build_engines(Manifest.load(engines), engines, workspace_gib=1.0, echo=lambda s: None)
    trt_pipe, ort_pipe = OneStepPipeline(engines, "trt"), OneStepPipeline(engines, "ort", "cpu")
    noise, img = Noise.draw(ort_pipe.manifest, 0), load_image(image, 32, 32)
    for tts in (False, True):
        first = trt_pipe.generate_pixels(img, noise, tts)
        assert np.abs(first - ort_pipe.generate_pixels(img, noise, tts)).max() < 1e-2  # TF32 tactics allowed
        assert np.array_equal(trt_pipe.generate_pixels(img, noise, tts), first)  # the CUDA-graph replay
    assert json.loads((engines / "manifest.json").read_text())["graphs"]["denoiser"]["engine"] == "denoiser.plan"


def _toy_denoise_np(x, sigma):
    return (x / np.float32(1.0 + sigma * sigma) + np.float32(0.1) * np.tanh(x)).astype(np.float32)


def test_generator_sampler_equals_the_torch_generator_sampler():
    """The numpy k-step generator (AVDM2's sampler in the runtime) equals `consistency_sample(consistency=False)`
    on the same ε and the same fresh draws between steps (torch draws them from its generator; here they are
    drawn first from a generator with the same seed)."""
    from export.runtime.sampler import generator_sample
    from prodistill.diffusion.samplers import consistency_sample
    from prodistill.sampling import student_sigmas

    sigmas, _ = student_sigmas(3, 40)
    shape = (1, 4, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want = consistency_sample(lambda x, s: torch.from_numpy(_toy_denoise_np(x.numpy(), float(s.flatten()[0]))),
                              noise, sigmas, torch.Generator().manual_seed(1), consistency=False)
    replay = torch.Generator().manual_seed(1)
    fresh = [torch.randn(shape, generator=replay).numpy() for _ in range(2)]
    got = generator_sample(_toy_denoise_np, noise.numpy(), fresh, [float(s) for s in sigmas])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, generator_sample(_toy_denoise_np, noise.numpy(), fresh[::-1],
                                                 [float(s) for s in sigmas]))  # the fresh draws matter


def test_a_generator_export_is_sampled_over_its_k_steps(tmp_path):
    """An AVDM2 config exports sampler "generator" with its --student-steps schedule (a consistency method:
    "consistency", no schedule); the runtime draws k − 1 fresh ε after the seed's first two draws, runs k
    denoiser calls, and refuses --tts in one sentence."""
    from conftest import tiny_config
    from export.run import generator_settings
    from export.runtime.manifest import Manifest
    from export.runtime.pipeline import Noise, OneStepPipeline
    from export.runtime.sampler import generator_sample
    from prodistill.sampling import student_sigmas

    assert generator_settings(tiny_config(tmp_path)) == {"sampler": "consistency", "sigmas_generator": []}
    settings = generator_settings(tiny_config(tmp_path, method="avdm2", student_steps=3))
    assert settings["sampler"] == "generator"
    assert settings["sigmas_generator"] == [float(s) for s in student_sigmas(3, 10)[0]]
    base = dict(width=16, height=16, frames=4, fps=7.0, motion_bucket_id=127, noise_aug_strength=0.02,
                latent_shape=[1, 4, 4, 2, 2], scaling_factor=0.18215, clip_size=32, clip_mean=[0.0] * 3,
                clip_std=[1.0] * 3, sigma_min=0.002, sigmas_1step=[80.0], sigmas_tts=[80.0, 20.0], num_timesteps=10,
                precision="fp32", opset=19, graphs={}, source={})
    consistency, generator = Manifest(**base), Manifest(**base, **settings)
    plain, noise = Noise.draw(consistency, 5), Noise.draw(generator, 5)
    assert plain.fresh == [] and len(noise.fresh) == 2
    np.testing.assert_array_equal(plain.latents, noise.latents)
    np.testing.assert_array_equal(plain.augmentation, noise.augmentation)

    calls = []

    class ToyBackend:
        def run(self, graph, inputs):
            calls.append(float(inputs["sigma"][0]))
            return {"denoised": _toy_denoise_np(inputs["x"], float(inputs["sigma"][0]))}

    pipe = object.__new__(OneStepPipeline)
    pipe.manifest, pipe.backend = generator, ToyBackend()
    got = pipe.sample({}, noise.latents, tts=False, fresh=noise.fresh)
    assert calls == pytest.approx(settings["sigmas_generator"])
    np.testing.assert_array_equal(got, generator_sample(_toy_denoise_np, noise.latents, noise.fresh,
                                                        settings["sigmas_generator"]))
    with pytest.raises(ValueError, match="generate without --tts"):
        pipe.sample({}, noise.latents, tts=True, fresh=noise.fresh)
