"""Shared fixtures: tiny models and a config small enough that a training step takes well under a second."""

from __future__ import annotations

import pytest
import torch

from prodistill.config import build_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built-in clips and compile caches go to a per-session temp folder, never into the user's home. Session-wide,
    so that module fixtures (the distributed tests' reference run) see it too: a function-scoped one was set up
    after them, and their run read the built-in clips of another cache than the run compared with it."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRODISTILL_CACHE", str(base / "cache"))
        mp.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
        yield


def tiny_config(tmp_path, **overrides):
    values = dict(out=str(tmp_path / "run"), preset="tiny", resolution="32x32", frames=4, max_steps=2,
                  device="cpu", lora_rank=2, disc_head_channels=8, log_every=1, ckpt_every=1, sample_every=0,
                  solver_steps=2, num_timesteps=10, warmup_steps=0)
    values.update(overrides)
    return build_config(values)


class RandomClips:
    """A resumable stand-in for ClipLoader: deterministic random pixel batches, no video decoding."""

    def __init__(self, batch_size: int, frames: int, size: int | tuple[int, int], seed: int = 0):
        width, height = (size, size) if isinstance(size, int) else size
        self.shape = (batch_size, frames, 3, height, width)
        self.seed, self.position = seed, 0

    def __next__(self) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.position)
        self.position += 1
        return {"pixels": torch.rand(self.shape, generator=gen) * 2 - 1}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_trainer(cfg, run_dir, stage: int | None = None, models=None, total_steps: int | None = None, **trainer_kw):
    """(Trainer, method, models) for `stage` (default: the method's only stage) on RandomClips at the stage's first
    resolution, seeded as `prodistill train` seeds a stage; `total_steps` (default: the config's) and `trainer_kw`
    go to the Trainer."""
    from prodistill.methods import build_method
    from prodistill.training.logger import MetricsLogger
    from prodistill.training.run import build_models
    from prodistill.training.trainer import Trainer

    models = models or build_models(cfg, torch.device("cpu"))
    stage = stage if stage is not None else cfg.stages()[-1]
    gen = torch.Generator().manual_seed(cfg.seed + stage)
    torch.manual_seed(cfg.seed + 1000 * stage)
    method = build_method(cfg, models, stage, gen)
    run_dir.mkdir(parents=True, exist_ok=True)
    loader = RandomClips(cfg.batch_size, cfg.frames, cfg.size_at(stage, 0))
    trainer = Trainer(cfg, method, loader, stage, run_dir / f"stage{stage}", total_steps or cfg.steps_for(stage), gen,
                      MetricsLogger(run_dir), **trainer_kw)
    return trainer, method, models


# -- export (issue 9) ------------------------------------------------------------------------------------------
def make_lora_run(tmp_path, seed: int = 0, **overrides):
    """A tiny run folder (config.yaml + a stage-1 checkpoint) whose student holds a random, non-zero LoRA,
    without training: merging and export must then change the teacher's output. Returns (cfg, run folder)."""
    from prodistill.models.student import trainable_parameters
    from prodistill.training.checkpoint import save_checkpoint
    from prodistill.training.run import build_models

    cfg = tiny_config(tmp_path, **{"frames": 4, "stage": "1", **overrides})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    student = build_models(cfg, torch.device("cpu")).make_student(cfg, stage=1)
    gen = torch.Generator().manual_seed(seed)
    params = trainable_parameters(student)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    save_checkpoint(run / "stage1", 1, {"student": params}, state={}, meta={"complete": True})
    return cfg, run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(cfg, run folder, engines folder, log lines): the tiny LoRA run exported once per session (fp32 ONNX)."""
    from export.run import ExportOptions, run_export

    cfg, run = make_lora_run(tmp_path_factory.mktemp("export"))
    log: list[str] = []
    run_export(ExportOptions(ckpt=run, out=run.parent / "engines", precision="fp32", device="cpu"), echo=log.append)
    return cfg, run, run.parent / "engines", log


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, oversubscribed OpenMP threads run tiny steps 10-30× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
