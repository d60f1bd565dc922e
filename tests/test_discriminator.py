"""CPU tests for the OSV latent video discriminator (tiny random DINOv2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prodistill.models.discriminator import (
    LatentUpsampler,
    LatentVideoDiscriminator,
    build_dinov2,
    default_layer_indices,
)

B, FRAMES, C_LAT = 2, 3, 4
IMAGE = 16  # tiny preset patch 4 -> 4x4 patch grid


def make_disc(seed: int = 0, **kw) -> LatentVideoDiscriminator:
    torch.manual_seed(seed)
    backbone = build_dinov2(None, "tiny")
    kw.setdefault("image_size", IMAGE)
    kw.setdefault("head_channels", 16)
    return LatentVideoDiscriminator(backbone, **kw)


def latents(h: int = 4, w: int = 4, requires_grad: bool = False, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, FRAMES, C_LAT, h, w, generator=g).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------
def test_upsampler_shape_and_op_order():
    torch.manual_seed(0)
    up = LatentUpsampler(latent_channels=4, out_channels=3, upscale=4)
    with torch.no_grad():  # non-trivial affine so the GroupNorm affine is exercised
        up.norm.weight.uniform_(0.5, 1.5)
        up.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 4, 6, 7)
    y = up(x)
    assert y.shape == (5, 3, 24, 28)
    ref = F.conv2d(x, up.conv.weight, up.conv.bias, padding=1)
    ref = F.pixel_shuffle(ref, 4)
    ref = F.group_norm(ref, 1, up.norm.weight, up.norm.bias, up.norm.eps)
    torch.testing.assert_close(y, ref)


def test_default_layer_indices():
    assert default_layer_indices(12) == [3, 6, 9, 12]
    assert default_layer_indices(4) == [1, 2, 3, 4]
    assert default_layer_indices(2) == [1, 2]
    assert default_layer_indices(24) == [6, 12, 18, 24]


@pytest.mark.parametrize("hw", [(4, 4), (6, 5)])  # exact fit and bilinear resize
def test_forward_shape_latent(hw):
    d = make_disc()
    assert d.layer_indices == [1, 2, 3, 4]
    out = d(latents(*hw))
    hp = wp = IMAGE // 4
    assert out.shape == (B, 2 * 4 * FRAMES * hp * wp) == (B, d.num_logits(FRAMES))
    assert torch.isfinite(out).all()
    parts = d.split_logits(out, FRAMES)
    assert set(parts) == {f"{k}/{i}" for k in ("spatial", "temporal") for i in (1, 2, 3, 4)}
    assert all(p.shape == (B, FRAMES, hp, wp) for p in parts.values())


def test_forward_shape_pixel():
    d = make_disc(input_kind="pixel", layer_indices=[2, 4])
    assert d.upsampler is None
    video = torch.rand(B, FRAMES, 3, 20, 24) * 2 - 1
    out = d(video)
    assert out.shape == (B, 2 * 2 * FRAMES * 4 * 4)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        d(latents())  # 4 channels in pixel mode


def test_backbone_frozen_but_differentiable():
    d = make_disc()
    x = latents(requires_grad=True)
    d(x).square().mean().backward()
    assert all(p.grad is None for p in d.backbone.parameters())
    assert all(not p.requires_grad for p in d.backbone.parameters())
    trainable = d.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in d.upsampler.parameters()} | {
        id(p) for p in d.heads.parameters()
    }
    for p in trainable:
        assert p.grad is not None
    assert d.upsampler.conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_train_keeps_backbone_eval():
    d = make_disc()
    d.train()
    assert d.training and d.heads.training and d.upsampler.training
    assert not d.backbone.training
    assert not any(m.training for m in d.backbone.modules())
    d.eval()
    assert not d.heads.training and not d.backbone.training
    d.train(True)
    assert not d.backbone.training


def test_temporal_heads_see_time():
    d = make_disc().eval()
    x = latents()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = d.split_logits(d(x), FRAMES)
        b = d.split_logits(d(x[:, perm]), FRAMES)
    for i in d.layer_indices:
        # spatial heads are per frame: shuffling frames permutes their logits
        torch.testing.assert_close(b[f"spatial/{i}"], a[f"spatial/{i}"][:, perm], rtol=1e-4, atol=1e-5)
        # temporal heads mix frames: the result is not just a permutation
        diff = (b[f"temporal/{i}"] - a[f"temporal/{i}"][:, perm]).abs().max()
        assert diff > 1e-3, f"temporal head at layer {i} is blind to frame order"


def test_trainable_state_dict_roundtrip():
    d1 = make_disc(seed=0)
    with torch.no_grad():
        for p in d1.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = d1.trainable_state_dict()
    assert sd and not any(k.startswith("backbone") for k in sd)
    assert all(k.startswith(("upsampler.", "heads.")) for k in sd)
    assert len(sd) == len(d1.trainable_parameters())  # GroupNorm/conv only: no buffers

    d2 = make_disc(seed=123)
    d2.backbone.load_state_dict(d1.backbone.state_dict())  # same frozen backbone, fresh heads
    x = latents()
    with torch.no_grad():
        assert not torch.allclose(d1.eval()(x), d2.eval()(x))
        d2.load_trainable_state_dict({k: v.clone() for k, v in sd.items()})
        torch.testing.assert_close(d2(x), d1(x), rtol=0, atol=0)

    with pytest.raises(RuntimeError):
        d2.load_trainable_state_dict({k: v for k, v in list(sd.items())[1:]})
    with pytest.raises(RuntimeError):
        d2.load_trainable_state_dict({**sd, "backbone.layernorm.weight": torch.ones(32)})


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="multiple of the backbone patch size"):
        make_disc(image_size=18)
    with pytest.raises(ValueError, match="1..4"):
        make_disc(layer_indices=[0, 2])
    with pytest.raises(ValueError, match="1..4"):
        make_disc(layer_indices=[5])
    with pytest.raises(ValueError):
        make_disc(layer_indices=[2, 2])
    with pytest.raises(ValueError):
        make_disc(input_kind="decoded")


def test_build_dinov2_presets_and_errors(tmp_path):
    tiny = build_dinov2(None, "tiny")
    assert tiny.config.hidden_size == 32 and tiny.config.num_hidden_layers == 4
    assert tiny.encoder.layer[0].mlp.fc1.out_features == 64
    with pytest.raises(ValueError, match="unknown DINOv2 preset"):
        build_dinov2(None, "huge")
    with pytest.raises(ValueError, match="could not load DINOv2 weights from"):
        build_dinov2(str(tmp_path / "missing"), "tiny")


def test_svd_xt_preset_architecture():
    from transformers import Dinov2Config

    # config only (building the 22M-param model is fine too, but keep the test fast)
    from prodistill.models.discriminator import _PRESETS

    cfg = Dinov2Config(**_PRESETS["svd-xt"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 12, 6)
    assert (cfg.mlp_ratio, cfg.patch_size, cfg.image_size) == (4, 14, 518)
