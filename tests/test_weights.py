"""Real-weights paths: a diffusers SVD folder and a transformers DINOv2 folder load and match; malformed
folders fail in one sentence before any model is built."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config
from prodistill.cli import main
from prodistill.diffusion.solvers import bind
from prodistill.models.discriminator import build_dinov2
from prodistill.models.presets import TINY
from prodistill.models.svd import SVDModels, WeightsError
from prodistill.training.run import build_models


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory):
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("svd")
    torch.manual_seed(0)
    models = SVDModels.build(TINY)
    models.unet.save_pretrained(root / "unet")
    models.vae.save_pretrained(root / "vae")
    models.image_encoder.save_pretrained(root / "image_encoder")
    CLIPImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(root / "feature_extractor")
    return root, models


def test_svd_folder_loads_the_same_networks(svd_folder, tmp_path):
    root, ref = svd_folder
    loaded = SVDModels.build(TINY, teacher=str(root))
    assert loaded.clip_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    cfg = tiny_config(tmp_path)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    cond = ref.condition(image, cfg.frames, cfg.fps, torch.Generator().manual_seed(0))
    x, sigma = torch.randn(1, cfg.frames, 4, 4, 4), torch.tensor([2.0])
    torch.testing.assert_close(bind(loaded.denoiser(loaded.teacher), cond)(x, sigma),
                               bind(ref.denoiser(ref.teacher), cond)(x, sigma))


def test_malformed_svd_folder_is_reported_before_loading(svd_folder, tmp_path):
    root, _ = svd_folder
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "unet").symlink_to(root / "unet")
    with pytest.raises(WeightsError, match="vae/config.json"):
        SVDModels.build(TINY, teacher=str(broken))


def test_dinov2_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = build_dinov2(None, "tiny")
    ref.save_pretrained(tmp_path / "dino")
    loaded = build_dinov2(str(tmp_path / "dino"))
    for (k, a), (_, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_cli_trains_from_weight_folders(svd_folder, tmp_path):
    root, _ = svd_folder
    torch.manual_seed(0)
    build_dinov2(None, "tiny").save_pretrained(tmp_path / "dino")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--teacher", str(root), "--dino", str(tmp_path / "dino"), "--out", str(out), "--stage", "1",
        "--max-steps", "1", "--resolution", "32x32", "--frames", "4", "--lora-rank", "2",
        "--disc-head-channels", "8", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "stage1" / "ckpt-0000001" / "student.safetensors").is_file()
    assert build_models(tiny_config(tmp_path, teacher=str(root)), torch.device("cpu")).clip_mean.flatten()[0] == 0.5


def test_malformed_dino_folder_is_refused_at_config_time(tmp_path):
    from prodistill.config import build_config

    (tmp_path / "dino").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        build_config({"dino": str(tmp_path / "dino")})
    with pytest.raises(WeightsError, match="unet/config.json"):
        build_config({"teacher": str(tmp_path / "dino")})
