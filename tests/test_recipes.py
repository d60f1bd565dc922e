"""Issue 14's recipe pieces: per-stage resolutions, the resolution schedule within a stage, and the paper recipes
shipped in configs/ (each with a tiny local variant that runs here)."""

from pathlib import Path

import pytest
import torch
import yaml

from conftest import RandomClips, make_lora_run, make_trainer, tiny_config
from prodistill.config import build_config, load_yaml
from prodistill.training.checkpoint import latest_checkpoint
from prodistill.training.logger import read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_schedule_parses_and_gives_each_step_its_resolution(tmp_path):
    cfg = build_config(dict(preset="svd-xt", method="osv", resolution="576x320", stage1_resolution="1024x768",
                            resolution_schedule="10000:1024x768", stage2_steps=20000))
    assert cfg.resolution_switches() == [(10000, (1024, 768))]
    assert cfg.size_at(1, 0) == cfg.size_at(1, 1999) == (1024, 768)
    assert cfg.size_at(2, 0) == cfg.size_at(2, 9999) == (576, 320)  # step = optimiser steps completed
    assert cfg.size_at(2, 10000) == cfg.size_at(2, 19999) == (1024, 768)
    assert cfg.sizes() == {(576, 320), (1024, 768)}
    two = tiny_config(tmp_path, max_steps=9, resolution_schedule="3:48x32, 6:64x48")
    assert [two.size_at(2, s) for s in (0, 2, 3, 5, 6, 8)] == [(32, 32)] * 2 + [(48, 32)] * 2 + [(64, 48)] * 2
    assert tiny_config(tmp_path, stage1_resolution="48x48", stage="1").sizes() == {(48, 48)}
    # the other methods have one stage (the distillation slot): --stage1-resolution does not apply to them
    assert tiny_config(tmp_path, method="lcm", stage1_resolution="48x48").size_at(2, 0) == (32, 32)
    one = build_config(dict(preset="svd-xt", resolution="576x320", resolution_schedule="5:1024x768")).at_resolution(
        (1024, 768))
    assert (one.size(), one.resolution_schedule, one.stage1_resolution) == ((1024, 768), None, None)
    # a stage-1-only run never reads the schedule, so a schedule beyond its steps is no error
    assert tiny_config(tmp_path, stage="1", max_steps=4, resolution_schedule="9:48x32").size_at(1) == (32, 32)


@pytest.mark.parametrize("schedule, message", [
    ("1024x768", "entries look like 10000:1024x768"),
    ("x:64x64", "entries look like"),
    ("0:64x64", "between 1 and --stage2-steps - 1 \\(3\\)"),
    ("4:64x64", "between 1 and --stage2-steps - 1"),
    ("2:64x64,1:48x48", "must increase"),
    ("2:64x64,2:48x48", "must increase"),
    ("2:60x64", "multiples of 16"),
])
def test_bad_schedules_are_one_sentence_before_anything_is_built(tmp_path, schedule, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, max_steps=4, resolution_schedule=schedule)
    with pytest.raises(ValueError, match="--stage1-resolution must look like"):
        tiny_config(tmp_path, stage1_resolution="big")


def test_a_quick_try_of_a_recipe_is_told_how_to_drop_its_schedule(tmp_path):
    with pytest.raises(ValueError, match="--max-steps 100 shortened the stage: .* --resolution-schedule '' for none"):
        build_config({"max_steps": 100}, CONFIGS / "osv.yaml")
    assert build_config({"max_steps": 100, "resolution_schedule": ""}, CONFIGS / "osv.yaml").sizes() == {
        (1024, 768), (576, 320)}


def _shapes_and_losses(trainer):
    """Record the pixel shape of every batch the method computes on; returns the list it fills."""
    shapes, compute = [], trainer.method.compute
    trainer.method.compute = lambda phase, batch, cache: (shapes.append(tuple(batch["pixels"].shape[-2:])),
                                                          compute(phase, batch, cache))[1]
    return shapes


def test_schedule_switches_the_loader_keeps_its_position_and_resumes_exactly(tmp_path):
    """LCM, 4 steps, 32x32 then 48x32 from step 2: the loader at the new size continues the old one's position,
    the hook runs once, and a run stopped after step 3 (past the switch) and resumed logs the same losses."""
    cfg = tiny_config(tmp_path, method="lcm", max_steps=4, resolution_schedule="2:48x32")
    resized = []
    kw = dict(loader_at=lambda size: RandomClips(cfg.batch_size, cfg.frames, size), on_resize=lambda: resized.append(1))
    straight, _, models = make_trainer(cfg, tmp_path / "straight", **kw)
    shapes = _shapes_and_losses(straight)
    straight.fit()
    assert shapes == [(32, 32)] * 2 + [(32, 48)] * 2 and len(resized) == 1
    assert straight.loader.position == 4  # one clip per step, none skipped or repeated by the switch
    first, _, _ = make_trainer(cfg, tmp_path / "resumed", models=models, total_steps=3, **kw)
    first.fit()
    second, _, _ = make_trainer(cfg, tmp_path / "resumed", models=models, **kw)
    shapes = _shapes_and_losses(second)
    second.resume(latest_checkpoint(tmp_path / "resumed" / "stage2"))
    second.fit()
    assert shapes == [(32, 48)]  # the resumed step trains at the size its step number gives
    losses = lambda d: [(r["step"], r["loss/g_total"]) for r in read_metrics(d)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4


def test_a_switch_without_a_loader_factory_is_an_error(tmp_path):
    cfg = tiny_config(tmp_path, method="lcm", max_steps=3, resolution_schedule="1:48x32")
    trainer, _, _ = make_trainer(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="cannot change resolution"):
        trainer.fit()


def test_compiled_regions_recompile_once_at_the_switch(tmp_path):
    """With every network compiled (dynamo, eager backend: the real tracing and guards), the step after the switch
    compiles new variants for the new shapes, and no other step after the first compiles anything."""
    from torch._dynamo.utils import counters

    from prodistill.accel import Speedups, accelerate

    cfg = tiny_config(tmp_path, method="lcm", max_steps=4, resolution_schedule="2:48x32", log_every=4, ckpt_every=4)
    trainer, method, models = make_trainer(cfg, tmp_path / "run",
                                           loader_at=lambda size: RandomClips(1, cfg.frames, size))
    accelerate(method, models, Speedups(compile="all", backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    compiled, step = [], trainer.train_step

    def counted(micro):
        before = counters["stats"]["unique_graphs"]
        out = step(micro)
        compiled.append(counters["stats"]["unique_graphs"] - before)
        return out

    trainer.train_step = counted
    trainer.fit()
    assert compiled[0] > 0 and compiled[2] > 0, compiled
    assert compiled[1] == compiled[3] == 0, compiled


def test_sampling_and_export_default_to_the_resolution_training_ended_at(tmp_path):
    from export.run import ExportOptions, _check_options
    from prodistill.sampling import load_run

    _, run = make_lora_run(tmp_path, stage1_resolution="48x32")
    assert load_run(run, "cpu").cfg.size() == (48, 32)
    export = lambda **kw: _check_options(ExportOptions(ckpt=run, out=tmp_path / "e", device="cpu", **kw))[0]  # noqa: E731
    assert export().size() == (48, 32) and export(resolution="64x64").size() == (64, 64)  # --resolution still wins


def test_each_checkpoint_is_used_at_the_resolution_its_student_last_trained_at(tmp_path):
    import json

    from prodistill.sampling import checkpoint_size
    from prodistill.training.checkpoint import META_FILE

    cfg = tiny_config(tmp_path, max_steps=4, stage1_resolution="48x32", resolution_schedule="2:32x48")
    expect = {(1, 4): (48, 32), (2, 1): (32, 32), (2, 2): (32, 32), (2, 3): (32, 48), (2, 4): (32, 48)}
    for (stage, step), size in expect.items():
        ckpt = tmp_path / f"stage{stage}" / f"ckpt-{step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / META_FILE).write_text(json.dumps({"step": step, "stage": stage}))
        assert checkpoint_size(cfg, ckpt) == size, (stage, step)


def test_resume_refuses_a_config_file_and_changed_networks(tmp_path):
    from click.testing import CliRunner

    from prodistill.cli import main

    _, run = make_lora_run(tmp_path)
    result = CliRunner().invoke(main, ["train", "--config", "osv-tiny", "--resume", "--out", str(run)])
    assert result.exit_code != 0 and "--resume continues a run with its own config" in result.output
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(run), "--lora-rank", "5", "--seed", "3"])
    assert result.exit_code != 0 and "--lora-rank differs from the run's" in result.output, result.output


def test_closing_a_loader_stops_its_workers_and_keeps_its_position(tmp_path):
    import multiprocessing
    import time

    from prodistill.data.builtin import ensure_builtin_clips
    from prodistill.data.dataset import ClipLoader, VideoClipDataset

    dataset = VideoClipDataset(sorted(ensure_builtin_clips().glob("*.mp4")), num_frames=2, resolution=(32, 32))
    before = set(multiprocessing.active_children())  # other tests' processes are not this loader's
    loader = ClipLoader(dataset, batch_size=1, num_workers=1)
    first = next(loader)["pixels"]
    workers = set(multiprocessing.active_children()) - before
    assert workers
    state = loader.state_dict()
    loader.close()
    for _ in range(50):
        if not any(w.is_alive() for w in workers):
            break
        time.sleep(0.1)
    assert not any(w.is_alive() for w in workers) and loader.state_dict() == state
    again = ClipLoader(dataset, batch_size=1)
    torch.testing.assert_close(next(again)["pixels"], first)
    torch.testing.assert_close(next(loader)["pixels"], next(again)["pixels"])  # goes on from where it was


def test_the_best_validation_is_kept_per_resolution(tmp_path):
    import json

    from prodistill.eval.validate import Validator

    val = object.__new__(Validator)  # mark_if_best reads only the folder and the real set's description
    val.folder = tmp_path / "val"
    marks = []
    for resolution, fvd, stage in (("48x32", 5.0, 1), ("48x32", 6.0, 1), ("32x48", 9.0, 2), ("32x48", 8.0, 2)):
        val.meta = {"resolution": resolution}
        marks.append(val.mark_if_best({"val/fvd": fvd}, stage, len(marks) + 1, None))
    assert marks == [True, False, True, True]  # 9 at a new resolution does not compare with 5 at the old one
    best = json.loads((val.folder / "best.json").read_text())
    assert (best["resolution"], best["fvd"], best["step"]) == ("32x48", 8.0, 4)


def test_release_graphs_resets_every_graphed_call(tmp_path):
    from prodistill.accel import release_graphs
    from prodistill.accel.graphs import GraphedCall, GraphedSolve

    class Holder:
        pass

    holder = Holder()
    holder.teacher_solve = GraphedSolve(lambda *a: a[0])
    holder.ema_d = GraphedCall(lambda x: x)
    holder.other = object()
    for call in (holder.teacher_solve, holder.ema_d):
        call.graphs[("shape",)] = ("graph", [], None)
        call.seen.add(("shape",))
        call.pool = "pool"
    assert release_graphs(holder) == 2
    assert all(not c.graphs and not c.seen and c.pool is None for c in (holder.teacher_solve, holder.ema_d))


def test_a_latent_cache_refuses_a_second_resolution(tmp_path):
    from prodistill.training.run import RunError, training_source

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text("{}")
    cfg = tiny_config(tmp_path, data=str(cache), max_steps=4, resolution_schedule="2:48x32")
    with pytest.raises(RunError, match="latent cache, which holds clips at one resolution"):
        training_source(cfg, torch.device("cpu"))
    with pytest.raises(RunError, match="need videos"):
        training_source(tiny_config(tmp_path, data=str(cache), stage="1", stage1_resolution="48x48"),
                        torch.device("cpu"))


# -- configs/ ------------------------------------------------------------------------------------------------------
PAPER = {
    # OSV §5: stage 1 at 1024x768 for 2K iterations (8 H800), stage 2 for 20K at 576x320, 1024x768 for the last 10K
    # (2 H800); batch 1, lr 5e-6, Adam, 100 timesteps, fps 7
    "osv.yaml": dict(method="osv", stage="both", stage1_resolution="1024x768", stage1_steps=2000,
                     resolution="576x320", stage2_steps=20000, resolution_schedule="10000:1024x768", batch_size=1,
                     lr=5e-6, num_timesteps=100, fps=7.0, preset="svd-xt"),
    # MCM §5: LoRA rank 64, lr 5e-6 / 5e-5 (discriminator), batch 128, 30K steps, λ_adv 1, λ_real 0.5, 512x512
    "mcm.yaml": dict(method="mcm", lora_rank=64, lr=5e-6, disc_lr=5e-5, stage2_steps=30000, lambda_adv=1.0,
                     lambda_real=0.5, resolution="512x512", preset="svd-xt"),
    # AVDM2 §5.1 / appendix: AdamW, 4e-6 spatial, 2e-5 motion, 2e-5 critics, wd 0.01, 500 warm-up, 10K iterations,
    # 16 frames at 512x512, batch 2 per GPU on 8 H800
    "avdm2.yaml": dict(method="avdm2", lr=4e-6, motion_lr_scale=5.0, disc_lr=2e-5, weight_decay=0.01,
                       warmup_steps=500, stage2_steps=10000, frames=16, resolution="512x512", batch_size=2,
                       preset="svd-xt"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_hold_the_papers_values_and_say_how_to_run(name):
    path = CONFIGS / name
    cfg = build_config({}, path)
    for key, value in PAPER[name].items():
        assert getattr(cfg, key) == value, key
    text = path.read_text()
    for heading in ("# Command", "# Paper's GPUs:", "# Expected time"):
        assert heading in text, f"{name} lacks a {heading!r} line"
    assert "prodistill train --config configs/" + name in text


def test_a_recipe_is_named_without_its_path_and_a_missing_file_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names resolve in the repository's configs/, wherever the command runs
    assert build_config({}, "osv") == build_config({}, CONFIGS / "osv.yaml")
    with pytest.raises(ValueError, match=r"--config nope: no such file; pass a YAML file or a recipe name \(avdm2, "):
        build_config({}, "nope")
    with pytest.raises(ValueError, match="no such file"):
        build_config({}, "sub/osv")  # a path is a path: only a bare name looks among the recipes
    with pytest.raises(ValueError, match="no such file"):
        build_config({}, "./osv")
    (tmp_path / "osv").mkdir()  # a folder of that name in the working directory does not hide the recipe
    assert build_config({}, "osv").resolution_schedule == "10000:1024x768"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_tiny_variants_train_end_to_end(tmp_path, name):
    """Each recipe's tiny variant runs as `prodistill train --config configs/NAME-tiny.yaml` (CPU, seconds); OSV's
    also changes resolution in both ways the recipe does, and its last preview is at the final resolution."""
    import av
    from click.testing import CliRunner

    from prodistill.cli import main

    tiny = CONFIGS / name.replace(".yaml", "-tiny.yaml")
    assert set(load_yaml(tiny)) >= {"method", "preset"} and load_yaml(tiny)["preset"] == "tiny"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(tiny), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = build_config({}, out / "config.yaml")
    assert read_metrics(out)[-1]["step"] == cfg.steps_for(cfg.stages()[-1])
    if name == "osv.yaml":
        assert cfg.stage1_resolution and cfg.resolution_schedule and cfg.stage1_resolution != cfg.resolution
        last = sorted((out / "samples").glob("stage2-*.mp4"))[-1]
        with av.open(str(last)) as video:
            stream = video.streams.video[0]
            assert (stream.width, stream.height) == cfg.size_at(2, cfg.steps_for(2) - 1)
        first = sorted((out / "samples").glob("stage1-*.mp4"))[-1]
        with av.open(str(first)) as video:
            stream = video.streams.video[0]
            assert f"{stream.width}x{stream.height}" == cfg.stage1_resolution
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == PAPER[name]["method"]
