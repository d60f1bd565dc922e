"""The training loop. It knows optimisers, accumulation, clipping, schedules, logging, checkpoints and
resume — and no method math: a `Method` supplies phases, parameters and losses.

One step = for each phase of the method (e.g. generator, then discriminator): accumulate gradients over
`grad_accum` micro-batches, clip, step the optimiser and the LR schedule, then call the method's hook (the
EMA update). A phase may update several times per step (`Method.updates_per_step`, e.g. AVDM2's critics
twice per generator update): the step then runs in rounds, round r updating every phase with more than r
updates, in phase order. The micro-batches are drawn once per step and shared by all phases and rounds.

Under torchrun the loop is the same on every rank; `prodistill.training.distributed` supplies the few places
where ranks differ or meet: gradient synchronisation (skipped for all but the last micro-batch of each
update), agreement on a stop request, losses averaged over ranks for the log, and rank 0 alone writing logs,
previews and checkpoints.

Progress: a tqdm bar on a terminal; where stderr is not one (Slurm, torchrun's per-rank log files, `nohup`),
one plain line per logging interval instead (`format_progress`), so a long run's log holds no redrawn bars.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prodistill.methods.base import Method
from prodistill.training.checkpoint import load_state, load_weights, save_checkpoint
from prodistill.training.distributed import Distributed, load_optimizers, rescale_loader_state
from prodistill.training.logger import MetricsLogger

log = logging.getLogger("prodistill")


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after finishing the current step and saving a checkpoint."""


@contextlib.contextmanager
def stop_requests():
    """While active, the first SIGINT or SIGTERM only sets `flag["signal"]` (the loop finishes its step and
    saves); a second SIGINT interrupts at once. Outside the main thread it does nothing."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if flag["signal"] is None:  # said at once: the step (a compiling one, say) may take a while yet
            again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            sys.stderr.write(f"\nsignal {signum}: stopping after this step and its checkpoint{again}\n")
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def format_progress(stage: int, step: int, total: int, sec_per_step: float, shown: dict[str, float]) -> str:
    """The plain progress line: `stage 2 step 40/200 | 0.512 s/step | ETA 0:01:22 | distance=0.0123 d=1.98`."""
    eta = datetime.timedelta(seconds=round(sec_per_step * max(total - step, 0)))
    values = " ".join(f"{k.split('/')[-1] if k.startswith('loss/') else k}={v:.4g}"
                      for k, v in shown.items() if k.startswith(("loss/", "d/logits")))
    return f"stage {stage} step {step}/{total} | {sec_per_step:.3f} s/step | ETA {eta} | {values}".rstrip(" |")


class Progress:
    """A tqdm bar where stderr is a terminal, else one `format_progress` line per logging interval; silent on
    ranks other than 0."""

    def __init__(self, stage: int, total: int, initial: int, enabled: bool = True):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=f"stage {stage}", unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, sec_per_step: float, shown: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1] if k.startswith("loss/") else k: f"{v:.3g}"
                                  for k, v in shown.items() if k.startswith(("loss/", "d/logits"))}, refresh=False)
        elif self.enabled:
            log.info(format_progress(self.stage, step, self.total, sec_per_step, shown))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def warmup_schedule(warmup_steps: int):
    """Linear warm-up from 1/warmup to 1, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Trainer:
    def __init__(self, cfg, method: Method, loader, stage: int, stage_dir: Path, total_steps: int,
                 generator: torch.Generator, logger: MetricsLogger, preview_fn=None, announce_first_step=False,
                 dist: Distributed | None = None, models=None, validator=None, loader_at=None, on_resize=None,
                 on_oom=None):
        self.cfg, self.method, self.loader, self.stage = cfg, method, loader, stage
        self.dist = dist or Distributed(device=generator.device)
        self.models = models
        """The method's models (only needed with --parallel fsdp, to name the sharded optimizer state)."""
        self.stage_dir, self.total_steps, self.generator, self.logger = stage_dir, total_steps, generator, logger
        self.preview_fn = preview_fn
        self.validator = validator
        """`prodistill.eval.validate.Validator` (--val-data), run every --val-every steps and at the stage's end."""
        self.announce_first_step = announce_first_step
        """Say that the first step compiles, and how long it took (compiled regions, CUDA-graph capture)."""
        self.size = cfg.size_at(stage, 0)
        """(W, H) of `loader`'s clips: the stage's first resolution (`TrainConfig.size_at`)."""
        self.on_oom = on_oom if self.dist.world_size == 1 else None
        """`on_oom()` after the GPU ran out of memory inside a phase's forward/backward passes: True when it freed
        what makes that update fit (`prodistill.accel.recover_from_oom`: the compiler's queue finished, so the
        update runs compiled rather than eagerly), and the update is then redone once, on the same micro-batches
        with the same random draws. None, and always under several processes (the ranks would disagree on the
        step): the error propagates."""
        self.loader_at, self.on_resize = loader_at, on_resize
        """`loader_at((W, H))` builds a loader at another resolution, for --resolution-schedule; `on_resize()` runs
        after each switch (releasing what was built for the old shapes, such as CUDA graphs)."""
        self.step = 0
        fused = generator.device.type == "cuda"
        self.optimizers, self.schedulers = {}, {}
        self.updates = {phase: method.updates_per_step(phase) for phase in method.phases}
        bad = {phase: n for phase, n in self.updates.items() if n < 1}
        if bad:
            raise ValueError(f"every phase needs at least one update per step, got {bad}")
        for phase in method.phases:
            lr = cfg.disc_lr if phase == "discriminator" else cfg.lr
            opt = torch.optim.AdamW(method.parameters(phase), lr=lr, betas=(0.9, 0.999),
                                    weight_decay=cfg.weight_decay, fused=fused or None)
            self.optimizers[phase] = opt
            self.schedulers[phase] = torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(cfg.warmup_steps))

    # -- state --------------------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """What differs between ranks: random streams and data position."""
        state = {"generator": self.generator.get_state(), "loader": self.loader.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self, ranks: list[dict] | None = None) -> dict:
        """Training state; `ranks` holds every rank's `rank_state` (rank 0's is also stored at the top level, as a
        single process stores its own)."""
        ranks = ranks or [self.rank_state()]
        state = {"step": self.step, "stage": self.stage, "world_size": len(ranks),
                 "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}, **ranks[0]}
        if len(ranks) > 1:
            state["ranks"] = ranks
        if not self.dist.sharded:
            state["optimizers"] = {k: o.state_dict() for k, o in self.optimizers.items()}
        return state

    def resume(self, ckpt: Path) -> None:
        device = self.generator.device
        self.method.load_weights(self.dist.localize(load_weights(ckpt, device), self.method.weights()))
        state = load_state(ckpt)
        self.step = int(state["step"])
        if "optimizers" in state:
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        else:  # written sharded by DCP (--parallel fsdp)
            load_optimizers(ckpt, self.optimizers, self.method, self.models)
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        mine = self.dist.rank_state(state)
        if mine is None:  # another number of ranks wrote it: same fraction of the epoch, streams re-derived
            loaders = [r["loader"] for r in state.get("ranks", [state])]
            self.loader.load_state_dict(rescale_loader_state(loaders, self.dist.world_size))
            self.generator.manual_seed(self.dist.rank_seed(self.cfg.seed + self.stage, self.step))
            log.info("resuming %d-rank checkpoint %s on %d ranks: data position rescaled, random streams re-derived",
                     int(state.get("world_size", 1)), ckpt, self.dist.world_size)
        else:
            self.generator.set_state(mine["generator"])
            self.loader.load_state_dict(mine["loader"])
            torch.set_rng_state(mine["torch_rng"])
            if "cuda_rng" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda_rng"])
        if self.dist.is_main:
            self.logger.truncate_after(self.stage, self.step)

    def save(self) -> Path | None:
        """Write a checkpoint (every rank calls this; rank 0 writes, and returns its path)."""
        ranks = self.dist.gather(self.rank_state())
        weights = self.dist.full_weights(self.method.weights())
        move_in = self.dist.save_sharded_optimizers(self.stage_dir, self.step, self.optimizers, self.method,
                                                    self.models)
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.stage_dir, self.step, weights, self.state_dict(ranks),
                                   meta={"stage": self.stage, "method": self.method.name,
                                         "complete": self.step >= self.total_steps},
                                   keep=self.cfg.keep_ckpts, move_in=move_in)
        self.dist.barrier()
        return path

    def _add_perf(self, rows: list[tuple[int, dict]], since: float) -> None:
        """Wall time per step over the logging interval (the logging sync makes it honest on GPU) and, on
        CUDA, peak memory since the stage started."""
        device = self.generator.device
        self._sync()
        per_step = (time.perf_counter() - since) / len(rows)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        extra = self.loader.stats() if hasattr(self.loader, "stats") else {}
        for _, logs in rows:
            logs["perf/sec_per_step"], logs["perf/peak_mem_gib"] = per_step, peak
            logs.update(extra)

    def _validate(self, ckpt: Path | None, main: bool) -> None:
        """Validation metrics of the current student into the metrics (rank 0), the best checkpoint by FVD marked;
        every rank generates (as for the preview: FSDP's forward needs them all)."""
        metrics = self.validator(self.method, score=main)
        if main:
            self.logger.write(self.stage, [(self.step, metrics)])
            self.validator.mark_if_best(metrics, self.stage, self.step, ckpt)
            log.info("stage %d step %d validation: %s", self.stage, self.step,
                     ", ".join(f"{k.removeprefix('val/')} {v:.4g}" for k, v in metrics.items()))

    def _follow_schedule(self) -> None:
        """Before a step: move to the resolution `--resolution-schedule` gives for it. The new loader takes the old
        one's position, so the clip order, the random streams and resume (which restores the position first, then
        switches here) are those of a run without the switch."""
        size = self.cfg.size_at(self.stage, self.step)
        if size == self.size:
            return
        if self.loader_at is None:
            raise ValueError(f"stage {self.stage} switches to {size[0]}x{size[1]} at step {self.step}, but this "
                             "loader cannot change resolution")
        loader = self.loader_at(size)
        loader.load_state_dict(self.loader.state_dict())
        if hasattr(self.loader, "close"):
            self.loader.close()  # its worker processes or DALI pipeline, now rather than whenever the GC runs
        self.loader, self.size = loader, size
        if self.on_resize is not None:
            self.on_resize()
        if self.dist.is_main:
            log.info("stage %d step %d: training at %dx%d from now on (--resolution-schedule)%s", self.stage, self.step,
                     *size, "; the next step compiles and captures for the new shapes" if self.announce_first_step else "")

    def _sync(self) -> None:
        if self.generator.device.type == "cuda":
            torch.cuda.synchronize(self.generator.device)

    # -- loop ---------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to `total_steps`. On SIGINT/SIGTERM (Ctrl-C, a cluster's pre-emption) the current step is
        finished, logged and checkpointed, then TrainingInterrupted is raised: `--resume` continues exactly."""
        with stop_requests() as stop:
            self._fit(stop)

    def train_step(self, micro: list[dict]) -> dict[str, torch.Tensor | float]:
        """Every phase's optimiser steps (`updates_per_step` each, in rounds) over the micro-batches `micro`;
        returns the (unsynchronised) logs, each phase's averaged over its updates. `prodistill bench train`
        times exactly this."""
        method = self.method
        caches: list[dict] = [{} for _ in micro]
        logs: dict[str, torch.Tensor | float] = {}
        for r in range(max(self.updates.values())):
            method.begin_round(r)
            for phase in method.phases:
                if self.updates[phase] > r:
                    self._update(phase, micro, caches, logs, last=r == self.updates[phase] - 1)
        return logs

    def _update(self, phase: str, micro: list[dict], caches: list[dict], logs: dict, last: bool) -> None:
        """One optimiser step of `phase`: accumulate over the micro-batches, clip, step, hook; after the
        phase's `last` update of the step, its LR schedule (warm-up counts training steps, not updates)."""
        opt, updates = self.optimizers[phase], self.updates[phase]
        saved = None
        if self.on_oom is not None:  # what the passes change (the caches need nothing: redone passes rewrite them)
            saved = (self.generator.get_state(), dict(logs))
        failure = None
        try:
            self._accumulate(phase, micro, caches, logs, updates)
        except torch.OutOfMemoryError as e:
            if saved is None:
                raise
            failure = (str(e).splitlines() or ["out of memory"])[0]
        if failure is not None:  # outside the except block: the failed passes' tensors went with its traceback
            self._redo_out_of_memory(phase, failure, saved, micro, caches, logs, updates)
        params = [p for g in opt.param_groups for p in g["params"]]
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = self.dist.clip_grad_norm_(params, limit)
        logs[f"grad_norm/{phase}"] = logs.get(f"grad_norm/{phase}", 0) + norm / updates
        logs[f"lr/{phase}"] = self.schedulers[phase].get_last_lr()[0]
        opt.step()
        if last:
            self.schedulers[phase].step()
        self.method.after_optimizer_step(phase)

    def _redo_out_of_memory(self, phase: str, failure: str, saved: tuple, micro: list[dict], caches: list[dict],
                            logs: dict, updates: int) -> None:
        """After `phase`'s passes ran out of GPU memory: if `on_oom` freed what makes them fit, redo them from the
        random state and logs `saved` before them; else an error that says what to lower."""
        if not self.on_oom():
            raise torch.OutOfMemoryError(
                f"the GPU ran out of memory in the {phase} update of stage {self.stage} step {self.step + 1} "
                f"({failure}); lower --batch-size (raise --grad-accum to keep the clips per step), --resolution or "
                "--frames, or add --grad-checkpointing")
        log.warning("the GPU ran out of memory in the %s update of step %d while region variants were still "
                    "compiling (the steps run eagerly meanwhile, which needs more memory than the compiled step); "
                    "the compiler has finished, so the update is redone compiled", phase, self.step + 1)
        self.generator.set_state(saved[0])
        logs.clear()
        logs.update(saved[1])
        self._accumulate(phase, micro, caches, logs, updates)

    def _accumulate(self, phase: str, micro: list[dict], caches: list[dict], logs: dict, updates: int) -> None:
        """The forward and backward passes of one update of `phase`: gradients summed over the micro-batches."""
        self.optimizers[phase].zero_grad(set_to_none=True)
        for i, (batch, cache) in enumerate(zip(micro, caches)):
            with self.dist.accumulating(skip_sync=i < len(micro) - 1):
                out = self.method.compute(phase, batch, cache)
                (out.loss / len(micro)).backward()
            cache.update(out.cache)
            for k, v in out.logs.items():
                logs[k] = logs.get(k, 0) + v / (len(micro) * updates)

    def _fit(self, stop: dict) -> None:
        cfg, method, main = self.cfg, self.method, self.dist.is_main
        method.train(True)
        pending: list[tuple[int, dict]] = []
        clock = time.perf_counter()
        progress = Progress(self.stage, self.total_steps, self.step, enabled=main)
        first = self.announce_first_step
        if first and main:
            log.info("stage %d: the first step compiles and captures (minutes at full size on a cold cache)",
                     self.stage)
        while self.step < self.total_steps:
            self._follow_schedule()
            micro = [next(self.loader) for _ in range(cfg.grad_accum)]
            logs = self.train_step(micro)
            self.step += 1
            if first:
                self._sync()
                if main:
                    log.info("stage %d: first step took %.1f s", self.stage, time.perf_counter() - clock)
                first = False
            progress.update()
            pending.append((self.step, logs))
            interrupted = self.dist.any(stop["signal"] is not None)
            last = self.step >= self.total_steps
            if self.step % cfg.log_every == 0 or last or interrupted:
                self._add_perf(pending, clock)
                self.dist.mean_logs(pending)
                if main:
                    shown = self.logger.write(self.stage, pending)
                    progress.report(self.step, shown["perf/sec_per_step"], shown)
                pending, clock = [], time.perf_counter()
            ckpt = None
            saved = self.step % cfg.ckpt_every == 0 or last or interrupted
            if saved:
                ckpt = self.save()
            if interrupted and not last:
                progress.close()
                cause = f"signal {stop['signal']}" if stop["signal"] is not None else "a signal to another rank"
                raise TrainingInterrupted(f"stopped by {cause} after step {self.step} of stage {self.stage}; a "
                                          "checkpoint was saved: rerun with --resume to continue")
            if self.preview_fn is not None and ((cfg.sample_every and self.step % cfg.sample_every == 0) or last):
                self.preview_fn(method, micro[0], self.stage, self.step)
            if self.validator is not None and ((cfg.val_every and self.step % cfg.val_every == 0) or last):
                self._validate(ckpt if saved else self.save(), main)
        progress.close()
        # a signal during the stage's last step, its checkpoint, preview or validation: the stage is saved; stop
        # before whatever would come next (the next stage; after the last one, the wait for background compiles)
        if self.dist.any(stop["signal"] is not None):
            cause = f"signal {stop['signal']}" if stop["signal"] is not None else "a signal to another rank"
            then = ("rerun with --resume to continue with the next stage" if self.stage != cfg.stages()[-1]
                    else "nothing is left to train")
            raise TrainingInterrupted(f"stopped by {cause} at the end of stage {self.stage}, which is complete and "
                                      f"saved; {then}")
