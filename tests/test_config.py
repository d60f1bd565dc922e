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


@pytest.mark.parametrize("overrides, message", [
    ({"fps": 0.0}, "--fps must be positive"),
    ({"fps": -3.0}, "--fps must be positive"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"lr": float("nan")}, "--lr must be positive"),
    ({"disc_lr": -1e-5}, "--disc-lr must be positive"),
    ({"huber_c": 0.0}, "--huber-c must be positive"),
    ({"lora_alpha": 0.0}, "--lora-alpha must be positive"),
    ({"disc_head_channels": 0}, "--disc-head-channels must be at least 1"),
    ({"seed": -1}, "--seed must be 0 or more"),
    ({"num_workers": -1}, "--num-workers must be 0 or more"),
    ({"sample_every": -1}, "--sample-every must be 0 or more"),
    ({"warmup_steps": -1}, "--warmup-steps must be 0 or more"),
    ({"lora_rank": -1}, "--lora-rank must be 0 or more"),
    ({"lora_rank": 0}, "--lora-rank 0 leaves the student nothing to train"),
    ({"lora_rank": 0, "stage": "2", "method": "avdm2", "train_modules": "conv_out"}, "--lora-rank 0"),
    ({"weight_decay": -0.01}, "--weight-decay must not be negative"),
    ({"grad_clip": -1.0}, "--grad-clip must not be negative"),
    ({"noise_aug_strength": -0.02}, "--noise-aug-strength must not be negative"),
    ({"motion_lr_scale": -5.0}, "--motion-lr-scale must not be negative"),
    ({"decoder_temporal_weight": -1.0}, "--decoder-temporal-weight must not be negative"),
    *[({name: -0.1}, f"--{name.replace('_', '-')} must not be negative")
      for name in ("lambda_lgp", "lambda_acd", "lambda_adm", "lambda_sdm")],
    ({"compile_workers": -5}, "--compile-workers must be -1"),
    ({"max_steps": -1}, "--max-steps must be at least 1"),  # not --stage1-steps, where resolve() copied it
    ({"max_steps": 0, "resolution_schedule": "2:32x32"}, "--max-steps must be at least 1"),
])
def test_numeric_ranges_are_refused_before_models(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides)


def test_lora_rank_zero_with_train_modules_is_accepted():
    assert build_config({"lora_rank": 0, "stage": "2", "train_modules": "conv_out"}).lora_rank == 0


def test_yaml_values_take_their_fields_types(tmp_path):
    path = tmp_path / "run.yaml"  # as written by hand: YAML 1.1 reads 1e-4 and "4" as strings, off as false
    path.write_text('lr: 1e-4\nframes: "4"\nfps: 7\nstage: 1\ncompile: off\nstage2_steps: 1e4\nhuber_c:\n')
    cfg = build_config({}, path)
    assert (cfg.lr, cfg.frames, cfg.fps, cfg.stage, cfg.compile, cfg.stage2_steps, cfg.huber_c) == \
        (1e-4, 4, 7.0, "1", "off", 10000, None)
    assert type(cfg.lr) is float and type(cfg.frames) is int and type(cfg.fps) is float


@pytest.mark.parametrize("text, message", [
    ("frames: 4.5\n", r"run\.yaml: frames \(--frames\) must be a whole number, got 4\.5"),
    ("lr: fast\n", r"run\.yaml: lr \(--lr\) must be a number, got 'fast'"),
    ("fused_ops: 'yes'\n", r"run\.yaml: fused_ops \(--fused-ops\) must be true or false, got 'yes'"),
    ("frames:\n", r"frames \(--frames\) must be a whole number, got no value"),
    ("lora_alpha: [8]\n", r"lora_alpha \(--lora-alpha\) must be a number or null, got \[8\]"),
])
def test_yaml_value_of_the_wrong_type_is_an_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        build_config({}, path)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("frames: 4\nlr: [1\n")
    with pytest.raises(ValueError, match=r"run\.yaml, line 3: not valid YAML .*line 2"):
        build_config({}, path)
    result = CliRunner().invoke(main, ["train", "--config", str(path)])
    assert result.exit_code != 0 and "Error: " in result.output and "line 3" in result.output
    assert "Traceback" not in result.output


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
