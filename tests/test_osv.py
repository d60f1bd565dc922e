"""OSV on the tiny preset: what each stage's step updates, stage chaining, and resume equivalence."""

from __future__ import annotations

import torch

from conftest import make_trainer, tiny_config
from prodistill.training.checkpoint import latest_checkpoint, load_weights
from prodistill.training.logger import read_metrics


def _snapshot(named):
    return {k: v.detach().clone() for k, v in named}


def _changed(before, module_named):
    now = dict(module_named)
    return {k for k, v in before.items() if not torch.equal(v, now[k].detach())}


def test_stage1_step_updates_only_lora_and_heads(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1)
    trainer, osv, models = make_trainer(cfg, stage=1, run_dir=tmp_path / "run")
    teacher = _snapshot(models.unet.named_parameters())
    backbone = _snapshot(osv.disc.backbone.named_parameters())
    student_all = _snapshot(osv.student.named_parameters())
    heads = _snapshot(osv.disc.trainable_state_dict().items())
    trainer.fit()
    assert not _changed(teacher, models.unet.named_parameters())
    assert not _changed(backbone, osv.disc.backbone.named_parameters())
    changed = _changed(student_all, osv.student.named_parameters())
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in student_all if "lora_B" in k} <= changed  # B starts at 0 and gets the first gradient
    assert _changed(heads, osv.disc.trainable_state_dict().items())


def test_stage2_step_updates_lora_modules_heads_and_ema(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1, train_modules="conv_out")
    trainer, osv, models = make_trainer(cfg, stage=2, run_dir=tmp_path / "run")
    teacher = _snapshot(models.unet.named_parameters())
    backbone = _snapshot(osv.disc.backbone.named_parameters())
    student_all = _snapshot(osv.student.named_parameters())
    ema = _snapshot(osv.ema.params.items())
    trainer.fit()
    assert not _changed(teacher, models.unet.named_parameters())
    assert not _changed(backbone, osv.disc.backbone.named_parameters())
    changed = _changed(student_all, osv.student.named_parameters())
    assert {"conv_out.weight", "conv_out.bias"} <= changed
    assert all("lora_" in k or k.startswith("conv_out") for k in changed)
    ema_changed = _changed(ema, osv.ema.params.items())
    assert ema_changed
    # θ⁻ ← μ·θ⁻ + (1 − μ)·θ after the generator step
    now = dict(osv.student.named_parameters())
    for k in ema_changed:
        expect = cfg.ema_decay * ema[k] + (1 - cfg.ema_decay) * now[k].detach()
        torch.testing.assert_close(osv.ema.params[k], expect)


def test_stage2_starts_from_stage1_student_and_discriminator(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1)
    run_dir = tmp_path / "run"
    t1, osv1, models = make_trainer(cfg, stage=1, run_dir=run_dir)
    t1.fit()
    _, osv2, _ = make_trainer(cfg, stage=2, run_dir=run_dir, models=models)
    osv2.load_weights(load_weights(latest_checkpoint(run_dir / "stage1")))
    for k, v in osv1.trainable.items():
        torch.testing.assert_close(osv2.trainable[k], v, rtol=0, atol=0)
        torch.testing.assert_close(osv2.ema.params[k], v.detach(), rtol=0, atol=0)
    for k, v in osv1.disc.trainable_state_dict().items():
        torch.testing.assert_close(osv2.disc.trainable_state_dict()[k], v, rtol=0, atol=0)


def _losses(run_dir, stage):
    return [(r["step"], r["loss/g_total"], r["loss/d"]) for r in read_metrics(run_dir) if r["stage"] == stage]


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    for stage in (1, 2):
        cfg = tiny_config(tmp_path, max_steps=4)
        straight = tmp_path / f"straight{stage}"
        trainer, _, models = make_trainer(cfg, stage=stage, run_dir=straight)
        trainer.fit()

        interrupted = tmp_path / f"interrupted{stage}"
        short = tiny_config(tmp_path, max_steps=2)
        t_a, _, _ = make_trainer(short, stage=stage, run_dir=interrupted, models=models)
        t_a.fit()
        t_b, _, _ = make_trainer(cfg, stage=stage, run_dir=interrupted, models=models)
        t_b.resume(latest_checkpoint(interrupted / f"stage{stage}"))
        assert t_b.step == 2
        t_b.fit()
        assert _losses(interrupted, stage) == _losses(straight, stage)
        assert len(_losses(straight, stage)) == 4


def test_decoded_discriminator_ablation_trains_through_the_vae_decoder(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1, disc_input="decoded")
    trainer, osv, models = make_trainer(cfg, stage=1, run_dir=tmp_path / "run")
    assert osv.disc.input_kind == "pixel"
    vae = _snapshot(models.vae.named_parameters())
    calls = []
    decode = models.decode_with_grad
    models.decode_with_grad = lambda z: calls.append(z.shape) or decode(z)
    lora_b = {k: v for k, v in _snapshot(osv.student.named_parameters()).items() if "lora_B" in k}
    trainer.fit()
    assert len(calls) == 3  # fake (generator phase), real and fake (discriminator phase)
    assert not _changed(vae, models.vae.named_parameters())
    assert _changed(lora_b, osv.student.named_parameters()) == set(lora_b)


def test_signal_finishes_the_step_saves_and_resume_matches(tmp_path):
    import os
    import signal

    import pytest

    from conftest import RandomClips
    from prodistill.training.trainer import TrainingInterrupted

    class Preempted(RandomClips):
        def __next__(self):
            if self.position == 1:  # while fetching step 2's batch, as a cluster pre-emption would
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__next__()

    cfg = tiny_config(tmp_path, max_steps=4, ckpt_every=10, log_every=10)
    straight, _, models = make_trainer(cfg, stage=2, run_dir=tmp_path / "straight")
    straight.fit()

    run = tmp_path / "preempted"
    t_a, _, _ = make_trainer(cfg, stage=2, run_dir=run, models=models)
    t_a.loader = Preempted(cfg.batch_size, cfg.frames, cfg.size()[0])
    with pytest.raises(TrainingInterrupted, match="after step 2"):
        t_a.fit()
    assert latest_checkpoint(run / "stage2").name == "ckpt-0000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    t_b, _, _ = make_trainer(cfg, stage=2, run_dir=run, models=models)
    t_b.resume(latest_checkpoint(run / "stage2"))
    t_b.fit()
    assert _losses(run, 2) == _losses(tmp_path / "straight", 2)


def test_a_signal_during_a_stages_last_step_stops_before_the_next_stage(tmp_path, capsys):
    """A pre-emption that lands in a stage's last step (or its checkpoint, preview or validation) is not dropped:
    the stage ends saved and the run stops there, rather than training stage 2 to its end (or, after the last stage,
    waiting for background compiles). The first signal is acknowledged at once."""
    import os
    import signal

    import pytest

    from conftest import RandomClips
    from prodistill.training.trainer import TrainingInterrupted

    class PreemptedAtTheEnd(RandomClips):
        def __next__(self):
            if self.position == 2:  # fetching the stage's last (third) step's batch
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__next__()

    cfg = tiny_config(tmp_path, max_steps=3, ckpt_every=10, log_every=10, stage="both")
    assert cfg.stages() == (1, 2)
    for stage, then in ((1, "rerun with --resume to continue with the next stage"), (2, "nothing is left to train")):
        trainer, _, _ = make_trainer(cfg, stage=stage, run_dir=tmp_path / f"run{stage}")
        trainer.loader = PreemptedAtTheEnd(cfg.batch_size, cfg.frames, cfg.size()[0])
        with pytest.raises(TrainingInterrupted, match=f"end of stage {stage}, which is complete and saved; {then}"):
            trainer.fit()
        assert latest_checkpoint(tmp_path / f"run{stage}" / f"stage{stage}").name == "ckpt-0000003"
        assert "signal 15: stopping after this step and its checkpoint\n" in capsys.readouterr().err
