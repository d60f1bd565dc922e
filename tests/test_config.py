"""Configuration precedence (paper defaults < preset < YAML < flags), validation and the generated CLI."""

import pytest
import yaml
from click.testing import CliRunner

from prodistill.cli import main
from prodistill.config import TrainConfig, build_config


def test_precedence(tmp_path):
    assert TrainConfig().lr == 5e-6  # the paper's value
    assert build_config({}).lr == 1e-4  # the tiny preset's own default
    assert build_config({"preset": "svd-xt"}).lr == 5e-6
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 3e-5, "solver-steps": 3, "frames": 8}))
    cfg = build_config({"frames": 6}, path)
    assert (cfg.lr, cfg.solver_steps, cfg.frames) == (3e-5, 3, 6)  # YAML beats the preset, flags beat YAML
    assert build_config({"max_steps": 7}).stage1_steps == build_config({"max_steps": 7}).stage2_steps == 7
    assert build_config({"resolution": None}).size() == (64, 64)


@pytest.mark.parametrize("overrides, message", [
    ({"resolution": "64"}, "WxH"),
    ({"resolution": "72x64"}, "multiples of 16"),
    ({"stage": "3"}, "--stage"),
    ({"solver_steps": 100}, "--solver-steps"),
    ({"frames": 1}, "--frames"),
    ({"ema_decay": 1.0}, "--ema-decay"),
    ({"dino": "/no/such/dino"}, "--dino"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rate"):
        build_config({}, path)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config({"frames": 6, "train_modules": "conv_out"})
    cfg.save(tmp_path / "c.yaml")
    assert build_config({}, tmp_path / "c.yaml") == cfg


def test_train_help_lists_every_field():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    for flag in ("--method", "--stage", "--preset", "--teacher", "--dino", "--data", "--out", "--max-steps",
                 "--resume", "--device", "--seed", "--config", "--resolution", "--frames", "--disc-input",
                 "--solver-steps", "--train-modules"):
        assert flag in out
