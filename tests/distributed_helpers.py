"""Code that runs in the worker processes of `test_distributed.py` (pytest does not collect this file).

- `spawn_checks(rank, ...)`: `torch.multiprocessing.spawn` target. Joins a 2-rank gloo job through the same
  environment variables torchrun sets, then (1) trains a toy method (a generator and a critic updated twice per
  step) under DDP and under FSDP2 next to a 1-rank reference on the same samples, (2) saves and resumes the
  FSDP trainer (DCP), (3) runs `run_training` itself (the path `prodistill train` takes) while recording what
  each rank read and wrote. Results go to OUT/rank{r}.pt for the tests to judge.
- As a script (`torchrun ... tests/distributed_helpers.py train ...`): prodistill's CLI, except that when
  PRODISTILL_TEST_KILL_STEP=k, rank 1 kills itself with SIGKILL just before step k of the first attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from prodistill.methods.base import Method, StepOutput
from prodistill.training.ema import EMA

SAMPLES = 64


# -- toy method: a 2-block MLP student, an EMA target in the loss, deterministic samples ------------------------
class ToyModels:
    """Stands in for SVDModels: a frozen teacher and a student factory (what FSDP sharding decorates)."""

    def __init__(self):
        torch.manual_seed(0)
        self.teacher = nn.Linear(3, 3).requires_grad_(False)

    def make_student(self, cfg, stage):
        torch.manual_seed(1)
        return ToyStudent(self.teacher)


class ToyStudent(nn.Module):
    """Frozen weights shared with the teacher (as the real student shares them), two repeated blocks (FSDP's
    units) and a head (the FSDP root's own parameters)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.frozen = teacher
        self.blocks = nn.ModuleList([nn.Linear(3, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen(x)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


class ToyMethod(Method):
    """A generator with an EMA target and a critic updated twice per step (as AVDM2's critics, in rounds) whose
    output is part of the generator's loss (as a GAN's discriminator), its parameters given as a group."""

    name = "toy"
    phases = ("generator", "critic")

    def __init__(self, models: ToyModels, generator: torch.Generator):
        self.student = models.make_student(None, 2)
        self.trainable = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        self.ema = EMA(self.trainable, 0.5)
        torch.manual_seed(2)
        self.critic = nn.Linear(1, 1)
        self.generator = generator

    def parameters(self, phase):
        if phase == "critic":
            return [{"params": list(self.critic.parameters())}]
        return list(self.trainable.values())

    def updates_per_step(self, phase):
        return 2 if phase == "critic" else 1

    def compute(self, phase, batch, cache):
        if phase == "critic":  # each of its two updates starts from the critic the previous one left
            loss = ((self.critic(cache["pred"]) - batch["y"]) ** 2).mean()
            return StepOutput(loss, {"loss/critic": loss.detach()})
        with torch.no_grad(), self.ema.swapped():
            target = self.student(batch["x"])  # the EMA target, as LCM/OSV evaluate it (θ⁻ swapped in)
        pred = self.student(batch["x"])
        loss = ((pred - batch["y"]) ** 2).mean() + 0.5 * ((pred - target) ** 2).mean() + 0.1 * self.critic(pred).mean()
        return StepOutput(loss, {"loss/toy": loss.detach()}, {"pred": pred.detach()})

    def after_optimizer_step(self, phase):
        if phase == "generator":
            self.ema.update()

    def weights(self):
        return {"student": dict(self.trainable), "ema": self.ema.state_dict(), "critic": self.critic.state_dict()}

    def load_weights(self, weights):
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(weights["student"][k])
        self.ema.load_state_dict(weights["ema"])
        self.critic.load_state_dict(weights["critic"])


class ToySamples:
    """Global step s uses samples [n·s, n·(s+1)) with n = ranks × micro-batches × batch; rank r's micro-batch m
    takes its consecutive slice, so the 1-rank reference with batch n sees exactly the same samples."""

    def __init__(self, rank: int, world: int, accum: int, batch: int = 1):
        gen = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(SAMPLES, 3, generator=gen), torch.randn(SAMPLES, 1, generator=gen)
        self.rank, self.world, self.accum, self.batch, self.draws = rank, world, accum, batch, 0

    def __next__(self):
        step, micro = divmod(self.draws, self.accum)
        start = (step * self.world * self.accum + self.rank * self.accum + micro) * self.batch
        self.draws += 1
        return {"x": self.x[start:start + self.batch], "y": self.y[start:start + self.batch]}

    def state_dict(self):
        return {"draws": self.draws}

    def load_state_dict(self, state):
        self.draws = state["draws"]


def toy_trainer(cfg, run_dir: Path, steps: int, dist=None, rank: int = 0, world: int = 1, batch: int = 1):
    from prodistill.training.logger import MetricsLogger
    from prodistill.training.trainer import Trainer

    models = ToyModels()
    gen = torch.Generator().manual_seed(0)
    context = dist.sharding_students(models) if dist is not None else _nothing()
    with context:
        method = ToyMethod(models, gen)
    if dist is not None:
        dist.wrap(method, models)
    loader = ToySamples(rank, world, cfg.grad_accum if dist is not None else 1, batch)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, method, loader, 2, run_dir / "stage2", steps, gen, MetricsLogger(run_dir), dist=dist,
                      models=models)
    return trainer, method


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def full_state(method) -> dict[str, torch.Tensor]:
    from prodistill.training.distributed import _full

    return {f"{g}/{k}": _full(v).detach().clone() for g, group in method.weights().items() for k, v in group.items()}


def toy_checks(ctx, cfg, out: Path) -> dict:
    """DDP and FSDP toy runs (2 ranks, batch 1, 2 micro-batches) and the 1-rank batch-4 reference."""
    from prodistill.training.checkpoint import latest_checkpoint

    results = {}
    ref_cfg = dataclasses.replace(cfg, grad_accum=1)
    ref, ref_method = toy_trainer(ref_cfg, out / f"ref{ctx.rank}", 3, batch=4)
    ref.fit()
    results["reference"] = full_state(ref_method)
    for parallel in ("ddp", "fsdp"):
        dist = dataclasses.replace(ctx, parallel=parallel, wrapped=[])
        trainer, method = toy_trainer(cfg, out / parallel, 3, dist, ctx.rank, ctx.world_size)
        trainer.fit()
        results[parallel] = full_state(method)
        results[f"{parallel}_sharded"] = any(type(p).__name__ == "DTensor" for p in method.trainable.values())
    # resume the FSDP run from its step-2 checkpoint (DCP optimizer state) and redo step 3
    dist = dataclasses.replace(ctx, parallel="fsdp", wrapped=[])
    trainer, method = toy_trainer(cfg, out / "fsdp-resumed", 3, dist, ctx.rank, ctx.world_size)
    ckpt = out / "fsdp" / "stage2" / "ckpt-0000002"
    trainer.resume(ckpt)
    trainer.fit()
    results["fsdp_resumed"] = full_state(method)
    results["fsdp_ckpt_has_optim"] = (ckpt / "optim" / ".metadata").is_file()
    results["fsdp_latest"] = str(latest_checkpoint(out / "fsdp" / "stage2"))
    return results


# -- the real training path, with its reads and writes recorded -------------------------------------------------
def recorded_run(cfg) -> dict:
    """`run_training(cfg)` recording the clips this rank drew (hashes) and the files it wrote."""
    import prodistill.data.video as video
    import prodistill.training.trainer as trainer_mod
    from prodistill.data.dataset import ClipLoader
    from prodistill.training.logger import MetricsLogger
    from prodistill.training.run import run_training

    seen, writes = [], {"checkpoint": 0, "metrics": 0, "preview": 0}
    next_batch, save, write_rows, write_mp4 = (ClipLoader.__next__, trainer_mod.save_checkpoint,
                                               MetricsLogger.write, video.write_mp4)

    def count(name, fn):
        def wrapped(*args, **kwargs):
            if name != "preview" or Path(args[0]).parent.name == "samples":  # not the built-in clips
                writes[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def recording_next(self):
        batch = next_batch(self)
        seen.extend(hashlib.sha1(clip.numpy().tobytes()).hexdigest() for clip in batch["pixels"])
        return batch

    ClipLoader.__next__ = recording_next
    trainer_mod.save_checkpoint = count("checkpoint", save)
    MetricsLogger.write = count("metrics", write_rows)
    video.write_mp4 = count("preview", write_mp4)
    try:
        run_training(cfg)
    finally:
        ClipLoader.__next__, trainer_mod.save_checkpoint, MetricsLogger.write, video.write_mp4 = (
            next_batch, save, write_rows, write_mp4)
    return {"seen": seen, "writes": writes}


def spawn_checks(rank: int, world: int, ports: tuple[int, int], out: str, toy_cfg, run_cfg) -> None:
    """`ports`: one per job this process joins (a second job on the first one's port can meet its leftovers)."""
    from prodistill.training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun's workers (and bitwise comparable with them)
    out = Path(out)
    ctx = distributed.setup(torch.device("cpu"), timeout_s=60)
    try:
        results = toy_checks(ctx, toy_cfg, out / "toy")
    finally:
        distributed.teardown(ctx)
    os.environ["MASTER_PORT"] = str(ports[1])
    results["run"] = recorded_run(run_cfg)
    torch.save(results, out / f"rank{rank}.pt")


# -- torchrun entry with an injected rank failure ---------------------------------------------------------------
def _kill_rank_one_before(step: int) -> None:
    from prodistill.training.trainer import Trainer

    train_step = Trainer.train_step

    def dying(self, micro):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, micro)

    Trainer.train_step = dying


if __name__ == "__main__":
    kill_step = int(os.environ.get("PRODISTILL_TEST_KILL_STEP", "0"))
    if kill_step and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _kill_rank_one_before(kill_step)
    from prodistill.cli import main

    main(sys.argv[1:], prog_name="prodistill")
