"""The training loop. It knows optimisers, accumulation, clipping, schedules, logging, checkpoints and
resume — and no method math: a `Method` supplies phases, parameters and losses.

One step = for each phase of the method (e.g. generator, then discriminator): accumulate gradients over
`grad_accum` micro-batches, clip, step the optimiser and the LR schedule, then call the method's hook (the
EMA update). A phase may update several times per step (`Method.updates_per_step`, e.g. AVDM2's critics
twice per generator update): the step then runs in rounds, round r updating every phase with more than r
updates, in phase order. The micro-batches are drawn once per step and shared by all phases and rounds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prodistill.methods.base import Method
from prodistill.training.checkpoint import load_state, load_weights, save_checkpoint
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
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def warmup_schedule(warmup_steps: int):
    """Linear warm-up from 1/warmup to 1, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Trainer:
    def __init__(self, cfg, method: Method, loader, stage: int, stage_dir: Path, total_steps: int,
                 generator: torch.Generator, logger: MetricsLogger, preview_fn=None, announce_first_step=False):
        self.cfg, self.method, self.loader, self.stage = cfg, method, loader, stage
        self.stage_dir, self.total_steps, self.generator, self.logger = stage_dir, total_steps, generator, logger
        self.preview_fn = preview_fn
        self.announce_first_step = announce_first_step
        """Say that the first step compiles, and how long it took (compiled regions, CUDA-graph capture)."""
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
    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "stage": self.stage,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def resume(self, ckpt: Path) -> None:
        self.method.load_weights(load_weights(ckpt, self.generator.device))
        state = load_state(ckpt)
        self.step = int(state["step"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.generator.set_state(state["generator"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.logger.truncate_after(self.stage, self.step)

    def save(self) -> Path:
        return save_checkpoint(self.stage_dir, self.step, self.method.weights(), self.state_dict(),
                               meta={"stage": self.stage, "method": self.method.name,
                                     "complete": self.step >= self.total_steps},
                               keep=self.cfg.keep_ckpts)

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
        opt.zero_grad(set_to_none=True)
        for batch, cache in zip(micro, caches):
            out = self.method.compute(phase, batch, cache)
            (out.loss / len(micro)).backward()
            cache.update(out.cache)
            for k, v in out.logs.items():
                logs[k] = logs.get(k, 0) + v / (len(micro) * updates)
        params = [p for g in opt.param_groups for p in g["params"]]
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        logs[f"grad_norm/{phase}"] = logs.get(f"grad_norm/{phase}", 0) + norm / updates
        logs[f"lr/{phase}"] = self.schedulers[phase].get_last_lr()[0]
        opt.step()
        if last:
            self.schedulers[phase].step()
        self.method.after_optimizer_step(phase)

    def _fit(self, stop: dict) -> None:
        cfg, method = self.cfg, self.method
        method.train(True)
        pending: list[tuple[int, dict]] = []
        clock = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {self.stage}", unit="step",
                   dynamic_ncols=True)
        first = self.announce_first_step
        if first:
            log.info("stage %d: the first step compiles and captures (minutes at full size on a cold cache)",
                     self.stage)
        while self.step < self.total_steps:
            micro = [next(self.loader) for _ in range(cfg.grad_accum)]
            logs = self.train_step(micro)
            self.step += 1
            if first:
                self._sync()
                log.info("stage %d: first step took %.1f s", self.stage, time.perf_counter() - clock)
                first = False
            bar.update(1)
            pending.append((self.step, logs))
            interrupted = stop["signal"] is not None
            last = self.step >= self.total_steps
            if self.step % cfg.log_every == 0 or last or interrupted:
                self._add_perf(pending, clock)
                shown = self.logger.write(self.stage, pending)
                pending, clock = [], time.perf_counter()
                bar.set_postfix({k.split("/")[-1] if k.startswith("loss/") else k: f"{v:.3g}"
                                 for k, v in shown.items() if k.startswith(("loss/", "d/logits"))}, refresh=False)
            if self.step % cfg.ckpt_every == 0 or last or interrupted:
                self.save()
            if interrupted and not last:
                bar.close()
                raise TrainingInterrupted(f"stopped by signal {stop['signal']} after step {self.step} of stage "
                                          f"{self.stage}; a checkpoint was saved: rerun with --resume to continue")
            if self.preview_fn is not None and ((cfg.sample_every and self.step % cfg.sample_every == 0) or last):
                self.preview_fn(method, micro[0], self.stage, self.step)
        bar.close()
