"""The tiny temporal decoder (issue 15): architecture, distillation on the shared trainer, resume, the decoder
folder, export parity in ONNX Runtime, and eval-decoder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_lora_run
from prodistill.cli import main
from prodistill.models.tiny_decoder import TinyTemporalDecoder, parse_channels

TINY = ["--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--device", "cpu", "--sample-every", "0",
        "--log-every", "1"]


def test_shapes_size_and_temporal_mixing():
    """8× upsampling, a few hundred thousand parameters at the default widths; the temporal mix starts as the
    identity (each frame decoded on its own) and, once trained, lets a frame's output depend on its neighbours."""
    torch.manual_seed(0)
    d = TinyTemporalDecoder(frames=5)
    assert d(torch.randn(2, 5, 4, 6, 8)).shape == (2, 5, 3, 48, 64)
    assert 2e5 < sum(p.numel() for p in d.parameters()) < 3e6
    z = torch.randn(1, 5, 4, 6, 8)
    bumped = z.clone()
    bumped[:, 1] += 1
    with torch.no_grad():
        assert torch.equal(d(z)[:, 2], d(bumped)[:, 2])  # identity mix: frame 2 ignores frame 1
        for m in d.modules():
            if type(m).__name__ == "TemporalMix":
                torch.nn.init.normal_(m.mix.weight, std=0.1)
        assert not torch.allclose(d(z)[:, 2], d(bumped)[:, 2])
    with pytest.raises(ValueError, match="built for 5 frames"):
        d(torch.randn(1, 4, 4, 6, 8))
    with pytest.raises(ValueError, match="4 positive widths"):
        parse_channels("64,64")


def test_train_decoder_learns_the_full_decoder_resumes_and_writes_its_folder(tmp_path, one_thread):
    """`prodistill train-decoder` on the built-in clips: the L1 distance to the full decoder's frames falls more than
    1.6× within 60 steps; a run stopped at step 30 and resumed ends with the same weights as the straight run;
    RUN/decoder loads back as the trained network."""
    from safetensors.torch import load_file

    from prodistill.training.logger import read_metrics

    args = [*TINY, "--max-steps", "60", "--lr", "3e-3", "--ckpt-every", "30"]
    straight = CliRunner().invoke(main, ["train-decoder", "--out", str(tmp_path / "a"), *args])
    assert straight.exit_code == 0, straight.output
    rows = read_metrics(tmp_path / "a")
    first, last = rows[0]["loss/pixel"], sum(r["loss/pixel"] for r in rows[-5:]) / 5
    assert last < first / 1.6, (first, last)  # measured: 0.266 → 0.134
    half = CliRunner().invoke(main, ["train-decoder", "--out", str(tmp_path / "b"), *args, "--max-steps", "30"])
    assert half.exit_code == 0, half.output
    resumed = CliRunner().invoke(main, ["train-decoder", "--out", str(tmp_path / "b"), *args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "a" / "stage2" / "ckpt-0000060" / "decoder.safetensors"))
    b = load_file(str(tmp_path / "b" / "stage2" / "ckpt-0000060" / "decoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = TinyTemporalDecoder.load(tmp_path / "a" / "decoder")
    assert all(torch.equal(folder.state_dict()[k], a[k]) for k in a)
    assert json.loads((tmp_path / "a" / "decoder" / "tiny_decoder.json").read_text())["frames"] == 4
    assert (tmp_path / "a" / "samples").glob("*.mp4")


def test_tiny_decoder_exports_with_onnx_runtime_parity(tmp_path):
    """`prodistill export --decoder tiny --tiny-decoder DIR`: the decoder graph is the tiny network, checked against
    torch in ONNX Runtime like every graph, and the manifest names its source."""
    pytest.importorskip("onnxruntime")
    _, run = make_lora_run(tmp_path)
    torch.manual_seed(0)
    TinyTemporalDecoder(channels=(16, 16, 8, 8), frames=4).save(tmp_path / "dec")
    result = CliRunner().invoke(main, ["export", "--ckpt", str(run), "--out", str(tmp_path / "eng"), "--precision",
                                       "fp32", "--device", "cpu", "--decoder", "tiny", "--tiny-decoder",
                                       str(tmp_path / "dec")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    parity = manifest["graphs"]["decoder"]["parity"]
    assert parity["rel"] <= 1e-4 and manifest["source"]["decoder"] == "tiny"
    assert manifest["source"]["tiny_decoder"] == str((tmp_path / "dec").resolve())
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "eng" / "decoder.onnx")).graph.node}
    assert "Conv" in ops and "GroupNormalization" not in ops  # the tiny network, not the VAE's decoder


def test_decoder_metrics_by_hand():
    """PSNR of a constant 0.1 offset on [−1, 1] frames: 10·log10(4/0.01) dB; SSIM of a clip with itself 1 and with
    noise below 1; flicker 0 for a constant offset (the frames move alike) and |2a| for alternating offsets ±a."""
    from prodistill.eval.decoder import flicker, psnr, ssim

    x = torch.rand(2, 5, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(x + 0.1, x) == pytest.approx(10 * torch.log10(torch.tensor(400.0)).item(), rel=1e-5)
    assert ssim(x[0], x[0]) == pytest.approx(1.0, abs=1e-6)
    assert ssim(x[0] + 0.3 * torch.randn(x[0].shape, generator=torch.Generator().manual_seed(1)), x[0]) < 0.9
    assert flicker(x + 0.1, x) == pytest.approx(0.0, abs=1e-6)
    sign = torch.tensor([1.0, -1, 1, -1, 1]).view(1, 5, 1, 1, 1)
    assert flicker(x + 0.05 * sign, x) == pytest.approx(0.1, rel=1e-5)


def test_eval_decoder_end_to_end(tmp_path, one_thread):
    """`prodistill eval-decoder` on a freshly trained tiny decoder: quality against the full decoder, timing of both
    in one run, a JSON; a folder without a decoder is one sentence."""
    from prodistill.data.builtin import ensure_builtin_clips

    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["train-decoder", "--out", str(run), *TINY, "--max-steps", "2"]).exit_code == 0
    result = CliRunner().invoke(main, ["eval-decoder", "--decoder", str(run / "decoder"), "--data",
                                       str(ensure_builtin_clips()), "--num-videos", "2", "--repeats", "1",
                                       "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "ev" / "eval-decoder.json").read_text())
    assert r["num_videos"] == 2 and 0 < r["quality"]["psnr"] < 100 and -1 <= r["quality"]["ssim"] <= 1
    assert r["timing"]["full"]["seconds"] > 0 and r["timing"]["tiny"]["seconds"] > 0
    assert "PSNR" in result.output and "decode 4x32x32" in result.output
    bad = CliRunner().invoke(main, ["eval-decoder", "--decoder", str(tmp_path), "--data", str(ensure_builtin_clips())])
    assert bad.exit_code != 0 and "no tiny decoder there" in bad.output and "Traceback" not in bad.output


def test_train_decoder_from_the_latent_cache_matches_training_from_videos(tmp_path, one_thread):
    """The latent cache works as input: the same seed gives the same losses from the cache as from the videos
    (the encoders ran in other batch compositions: equal up to float rounding)."""
    from prodistill.training.logger import read_metrics

    common = ["--resolution", "32x32", "--frames", "4", "--device", "cpu"]
    cache = tmp_path / "cache"
    assert CliRunner().invoke(main, ["data", "cache", "--out", str(cache), *common]).exit_code == 0
    losses = {}
    for name, extra in (("videos", []), ("cached", ["--data", str(cache)])):
        result = CliRunner().invoke(main, ["train-decoder", "--out", str(tmp_path / name), *TINY, "--max-steps", "3",
                                           *extra])
        assert result.exit_code == 0, result.output
        losses[name] = [r["loss/g_total"] for r in read_metrics(tmp_path / name)]
    assert len(losses["videos"]) == 3
    assert losses["cached"] == pytest.approx(losses["videos"], rel=1e-5)
