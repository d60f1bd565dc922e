"""The generic loop on a toy method with known gradients: accumulation, clipping, warm-up, phase order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_config
from prodistill.methods.base import Method, StepOutput
from prodistill.training.logger import MetricsLogger, read_metrics
from prodistill.training.trainer import Trainer, warmup_schedule


class Toy(Method):
    """loss_g = (w − x)², loss_d = (v − x)² per micro-batch; records the gradient the optimiser saw."""

    phases = ("generator", "discriminator")

    def __init__(self):
        self.w, self.v = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.seen, self.order, self.generator = [], [], torch.Generator()

    def parameters(self, phase):
        return [self.w] if phase == "generator" else [self.v]

    def compute(self, phase, batch, cache):
        self.order.append((phase, float(batch["x"])))
        p = self.w if phase == "generator" else self.v
        loss = ((p - batch["x"]) ** 2).sum()
        return StepOutput(loss, {f"loss/{phase}": loss.detach()}, {"x": batch["x"]})

    def weights(self):
        return {"toy": {"w": self.w, "v": self.v}}

    def after_optimizer_step(self, phase):
        self.seen.append((phase, self.parameters(phase)[0].grad.item()))


class Numbers:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": torch.tensor([float(self.i)])}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_accumulation_averages_gradients_and_phases_share_micro_batches(tmp_path):
    cfg = tiny_config(tmp_path, grad_accum=2, max_steps=1, grad_clip=0.0)
    toy = Toy()
    Trainer(cfg, toy, Numbers(), 1, tmp_path / "s", 1, toy.generator, MetricsLogger(tmp_path)).fit()
    # d/dw of ((w−1)² + (w−2)²)/2 at w = 0 is (−2 − 4)/2 = −3
    assert toy.seen == [("generator", -3.0), ("discriminator", -3.0)]
    assert toy.order == [("generator", 1.0), ("generator", 2.0), ("discriminator", 1.0), ("discriminator", 2.0)]
    row = read_metrics(tmp_path)[0]
    assert row["loss/generator"] == 2.5  # (1 + 4)/2
    assert row["grad_norm/generator"] == 3.0


def test_clipping_limits_the_update(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1, grad_clip=0.5)
    toy = Toy()
    Trainer(cfg, toy, Numbers(), 1, tmp_path / "s", 1, toy.generator, MetricsLogger(tmp_path)).fit()
    assert toy.seen[0][1] == pytest.approx(-0.5, rel=1e-5)  # gradient −2 clipped to norm 0.5
    assert read_metrics(tmp_path)[0]["grad_norm/generator"] == 2.0  # the norm before clipping is logged


def test_warmup_schedule():
    f = warmup_schedule(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_schedule(0)(0) == 1.0


class TwoTimescale(Toy):
    """The toy with the discriminator updated three times per generator update; each update records the
    phase, the round it ran in and the learning rate it used."""

    def __init__(self):
        super().__init__()
        self.rounds, self.round = [], None

    def updates_per_step(self, phase):
        return 3 if phase == "discriminator" else 1

    def begin_round(self, index):
        self.round = index

    def parameters(self, phase):
        return [{"params": super().parameters(phase), "lr": 1.0 if phase == "generator" else 0.5}]

    def after_optimizer_step(self, phase):
        self.seen.append((phase, super().parameters(phase)[0].grad.item()))

    def compute(self, phase, batch, cache):
        self.rounds.append((phase, self.round))
        return super().compute(phase, batch, cache)


def test_updates_per_step_runs_rounds_and_steps_the_schedule_once_per_step(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, grad_clip=0.0, warmup_steps=4)
    toy = TwoTimescale()
    trainer = Trainer(cfg, toy, Numbers(), 2, tmp_path / "s", 2, toy.generator, MetricsLogger(tmp_path))
    trainer.fit()
    step = [("generator", 0), ("discriminator", 0), ("discriminator", 1), ("discriminator", 2)]
    assert toy.rounds == step + step
    assert [p for p, _ in toy.seen] == [p for p, _ in step] * 2  # optimiser steps: 1 + 3 per training step
    assert trainer.optimizers["discriminator"].state[toy.v]["step"] == 6
    assert trainer.optimizers["generator"].state[toy.w]["step"] == 2
    rows = read_metrics(tmp_path)
    # warm-up counts training steps (2 of 4), not updates, and the parameter groups' own lr is what it scales
    assert [r["lr/discriminator"] for r in rows] == [0.125, 0.25]
    assert [r["lr/generator"] for r in rows] == [0.25, 0.5]
    # the logged discriminator terms are means over its three updates: loss (v − 1)² = (g/2)², norm |g|
    grads = [g for _, g in toy.seen[1:4]]
    assert rows[0]["loss/discriminator"] == pytest.approx(sum((g / 2) ** 2 for g in grads) / 3, rel=1e-6)
    assert rows[0]["grad_norm/discriminator"] == pytest.approx(sum(abs(g) for g in grads) / 3, rel=1e-6)
    assert len(set(grads)) == 3  # each update saw the parameter its predecessor moved


def test_a_phase_without_updates_is_refused(tmp_path):
    toy = TwoTimescale()
    toy.updates_per_step = lambda phase: 0
    with pytest.raises(ValueError, match="at least one update"):
        Trainer(tiny_config(tmp_path), toy, Numbers(), 2, tmp_path / "s", 1, toy.generator, MetricsLogger(tmp_path))


class RunsOutOnce(Toy):
    """Toy, drawing noise from its generator, that runs out of GPU memory in `phase`'s backward once, at `fail_at` (a
    count of that phase's computes), after its draws and its log entry."""

    def __init__(self, fail_at=None, phase="generator"):
        super().__init__()
        self.generator.manual_seed(0)
        self.calls, self.fail_at, self.failing_phase = 0, fail_at, phase

    def compute(self, phase, batch, cache):
        noise = torch.randn(1, generator=self.generator)
        out = super().compute(phase, {"x": batch["x"] + noise}, cache)
        if phase == self.failing_phase:
            self.calls += 1
            if self.calls == self.fail_at:
                class Boom(torch.autograd.Function):
                    @staticmethod
                    def forward(ctx, x):
                        return x.clone()

                    @staticmethod
                    def backward(ctx, g):
                        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

                return StepOutput(Boom.apply(out.loss), out.logs, out.cache)
        return out


def _toy_run(tmp_path, name, method, on_oom=None):
    cfg = tiny_config(tmp_path, grad_accum=2, max_steps=3, log_every=1)
    (tmp_path / name).mkdir()
    Trainer(cfg, method, Numbers(), 1, tmp_path / name / "s", 3, method.generator, MetricsLogger(tmp_path / name),
            on_oom=on_oom).fit()
    return [(r["step"], r["loss/generator"], r["loss/discriminator"]) for r in read_metrics(tmp_path / name)]


@pytest.mark.parametrize("phase", ["generator", "discriminator"])
def test_running_out_of_memory_while_compiling_redoes_the_update_exactly(tmp_path, phase):
    """The GPU running out of memory in a phase's passes (eager steps while the compiler works): with a hook that
    frees memory the update is redone on the same micro-batches and random draws, so the run logs what an
    uninterrupted run logs and steps the optimiser once; without one, or when the hook frees nothing, the error
    says what to lower."""
    straight = RunsOutOnce()
    want = _toy_run(tmp_path, "straight", straight)
    hooks = []
    failing = RunsOutOnce(fail_at=4, phase=phase)  # step 2's second micro-batch
    got = _toy_run(tmp_path, "recovered", failing, on_oom=lambda: hooks.append(1) or True)
    assert hooks == [1] and got == want
    assert failing.seen == straight.seen and torch.equal(failing.w, straight.w) and torch.equal(failing.v, straight.v)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        _toy_run(tmp_path, "plain", RunsOutOnce(fail_at=4, phase=phase))
    with pytest.raises(torch.OutOfMemoryError, match=rf"{phase} update of stage 1 step 2 .*--batch-size"):
        _toy_run(tmp_path, "nothing", RunsOutOnce(fail_at=4, phase=phase), on_oom=lambda: False)
    from prodistill.training.distributed import Distributed

    toy = Toy()  # several processes: no redo (the ranks would disagree on the step)
    several = Trainer(tiny_config(tmp_path), toy, Numbers(), 1, tmp_path / "several", 1, toy.generator,
                      MetricsLogger(tmp_path), dist=Distributed(world_size=2), on_oom=lambda: True)
    assert several.on_oom is None


def test_recover_from_oom_waits_for_queued_variants_only(monkeypatch):
    from prodistill.accel import precompile, recover_from_oom

    flushed = []

    class Busy:
        queue = {"variant": object()}

        def pending(self):
            return False

        def flush(self):
            flushed.append(1)
            self.queue = {}

    monkeypatch.setattr(precompile, "_SHARED", {("cache", "inductor"): Busy()})
    assert recover_from_oom() and flushed == [1]
    assert not recover_from_oom() and flushed == [1]  # nothing left to compile: the step itself does not fit


def test_a_folder_with_checkpoints_but_no_config_is_refused_the_same_way_with_or_without_resume(tmp_path):
    """Without config.yaml a folder's checkpoints cannot be resumed (their settings are unknown), nor trained over:
    both commands say so and point at another --out, rather than each pointing at the other."""
    from dataclasses import replace

    from prodistill.training.run import RunError, check_run_dir

    cfg = tiny_config(tmp_path)
    ckpt = tmp_path / "run" / "stage1" / "ckpt-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 1}')
    for resume in (False, True):
        with pytest.raises(RunError, match="holds checkpoints but no config.yaml.*choose another --out"):
            check_run_dir(replace(cfg, resume=resume))


def test_mistyped_student_targets_are_refused_before_stage_1_trains(tmp_path, monkeypatch):
    """A --train-modules regex that is no regex is refused before any model is built; one that matches nothing,
    or a --lora-targets name no module has, once the teacher is built — before stage 1 trains, where stage 2's
    student used to find it only after stage 1 had trained (and its folder could then be neither resumed with the
    corrected value nor restarted)."""
    from dataclasses import replace

    from prodistill.training import run

    built = []
    real_build = run.build_models
    monkeypatch.setattr(run, "build_models", lambda *a: built.append(1) or real_build(*a))
    monkeypatch.setattr(run, "_run_stage", lambda *a, **k: pytest.fail("a stage ran"))
    cfg = tiny_config(tmp_path, stage="both")
    for changes, message, before_models in (
            (dict(train_modules="["), r"--train-modules '\[' is not a regular expression", True),
            (dict(train_modules="temporal_transformer_blocks,nomatch_xyz"), "--train-modules nomatch_xyz matches no "
             "parameter of the UNet", False),
            (dict(lora_targets="to_q,to_kk"), "--lora-targets to_kk: no module of the UNet is named so", False)):
        built.clear()
        with pytest.raises(ValueError, match=message):
            run.run_training(replace(cfg, **changes))
        assert built == ([] if before_models else [1])


def test_a_damaged_checkpoint_is_one_sentence_on_resume(tmp_path):
    """A checkpoint whose file was damaged (disk trouble: prodistill writes them atomically) is named, with what to
    do, instead of a traceback from deep inside torch.load."""
    from dataclasses import replace

    from prodistill.training.checkpoint import CheckpointError, latest_checkpoint
    from prodistill.training.run import run_training

    cfg = tiny_config(tmp_path, stage="2", max_steps=1)
    run = run_training(cfg)
    ckpt = latest_checkpoint(run / "stage2")
    state = ckpt / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"the checkpoint file {state} cannot be read .*damaged; remove {ckpt} "):
        run_training(replace(cfg, resume=True, stage2_steps=2))
    stage1 = tmp_path / "two"  # and where stage 2 starts from stage 1's weights
    run_training(replace(cfg, out=str(stage1), stage="1"))
    weights = latest_checkpoint(stage1 / "stage1") / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=f"the checkpoint file {weights} cannot be read"):
        run_training(replace(cfg, out=str(stage1), stage="both", resume=True))
