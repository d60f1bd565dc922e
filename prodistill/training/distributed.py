"""Many processes, one run: everything `torchrun --nproc-per-node N -m prodistill train ...` changes, in one file.

PyTorch's own stack does the work — torchrun starts and restarts the processes, `torch.distributed` connects
them, DDP (`replicate`) or FSDP2 (`fully_shard`) synchronises gradients, `torch.distributed.checkpoint` writes
sharded optimizer state. This module decides where each applies; the trainer calls it at a handful of seams and
the methods never see it.

Why the *composable* (in-place) DDP and FSDP2 rather than the `DistributedDataParallel` wrapper: a method calls its
networks through closures it built in `__init__` (the student's denoiser, its EMA twin, the discriminator), so
a wrapper object would have to be threaded into every method. `replicate` and `fully_shard` put their hooks on
the module itself, so the method keeps calling the module it built and the hooks synchronise. Both are real DDP
and FSDP2 underneath (`replicate` builds a `DistributedDataParallel` over the module's parameters).

What is synchronised, and what is not:
- Trainable modules (the LoRA student and any `--train-modules`, the discriminator's upsampler and heads):
  `--parallel ddp` averages their gradients (frozen sub-trees such as DINOv2 are left out of DDP entirely);
  `--parallel fsdp` shards the student's *trainable* parameters, their gradients and Adam state over the ranks
  (per repeated block, then the rest) and leaves its frozen weights — shared with the teacher — alone.
- Frozen models (teacher, VAE, CLIP, DINOv2) are built identically on every rank from the seed or the weights and
  are never broadcast nor all-reduced.
- The EMA target is updated on every rank from identical parameters, so it stays identical (tested).
- Noise and data differ per rank: rank r's generator is seeded from (seed, stage, r) (rank 0 keeps the
  single-process seed, so a 1-rank run is the plain run) and the loader takes rank r's disjoint share.

Checkpoints: rank 0 writes them, atomically as always; each rank's RNG and data position are gathered into
state.pt, so `--resume` with the same N continues exactly. With FSDP the full weights are gathered for the
safetensors (what `sample` and `export` read) and the optimizer state is saved sharded by DCP into `optim/`.
Resuming N ranks' checkpoint on M ranks works; what changes: each rank's data position becomes the same fraction
of the epoch (some clips of that epoch may be seen twice or not at all) and the RNG streams are re-derived from
(seed, stage, rank, step), so the run continues correctly but not bit-for-bit as it would have on N ranks.

Failure: every collective has a timeout (`--dist-timeout`), so a dead or hung rank ends the job with an error
instead of a hang; torchrun notices a dead worker within seconds and stops the others. With
`torchrun --max-restarts K` the restarted workers (TORCHELASTIC_RESTART_COUNT > 0) resume from the last
checkpoint without `--resume` being given.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("prodistill")


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or another launcher setting RANK and WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (`--max-restarts`); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class Distributed:
    """This process's place in the job. With `world_size == 1` every method is a no-op, so the trainer needs
    no special case for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "ddp"
    control: object = None
    """A gloo group for host-side agreement (stop requests, gathered RNG states), so they never touch the GPU."""
    wrapped: list[nn.Module] = field(default_factory=list)
    """The modules whose gradients are synchronised (replicated or sharded)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.parallel == "fsdp"

    # -- seeds ------------------------------------------------------------------------------------------------
    def rank_seed(self, base: int, step: int | None = None) -> int:
        """Seed of this rank's random stream: `base` itself on rank 0 of a fresh stream (so one rank is the plain
        run), else derived from (base, rank[, step]) — `step` when streams are re-derived on resume."""
        if self.rank == 0 and step is None:
            return base
        key = [base, self.rank] + ([] if step is None else [step])
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    # -- wrapping ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sharding_students(self, models) -> Iterator[None]:
        """With `--parallel fsdp`, students made inside the block are sharded as soon as they exist — before the
        method keeps references to their parameters (FSDP2 replaces them by sharded ones)."""
        if not self.sharded:
            yield
            return
        make = models.make_student

        def make_sharded(cfg, stage):
            student = make(cfg, stage)
            self._fully_shard(student)
            return student

        models.make_student = make_sharded
        try:
            yield
        finally:
            del models.make_student

    def _fully_shard(self, module: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        frozen = {p for p in module.parameters() if not p.requires_grad}
        # reshard after every forward, the root's too (FSDP2 keeps the root gathered by default): the EMA target
        # writes θ⁻ into the shards and the next forward must gather what the shards hold (ema.py)
        for unit in [*_shard_units(module), module]:
            fully_shard(unit, mesh=mesh, ignored_params=frozen, reshard_after_forward=True)
        self.wrapped.append(module)

    def wrap(self, method, models) -> None:
        """DDP (`replicate`) on every trainable module of `method` that FSDP does not already manage, then check
        that every parameter the optimisers will step is synchronised."""
        if not self.enabled:
            return
        from torch.distributed._composable.replicate import replicate

        from prodistill.accel import method_networks

        for net in method_networks(method, models):
            if net in self.wrapped or not any(p.requires_grad for p in net.parameters()):
                continue
            frozen = [m for m in net.modules() if m is not net and not any(p.requires_grad for p in m.parameters())]
            replicate(net, ignored_modules=frozen)
            self.wrapped.append(net)
        covered = {id(p) for m in self.wrapped for p in m.parameters()}
        for phase in method.phases:
            groups = method.parameters(phase)  # parameters, or parameter groups (dicts with "params")
            params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else (g,))]
            if any(id(p) not in covered for p in params):
                raise RuntimeError(f"method {method.name!r} trains parameters of phase {phase!r} that are not held "
                                   "by an nn.Module attribute of the method, so distributed training cannot "
                                   "synchronise them; keep trainable networks as attributes of the method")

    @contextlib.contextmanager
    def accumulating(self, skip_sync: bool) -> Iterator[None]:
        """Inside, backward passes keep gradients local (`skip_sync`: a micro-batch that is not the last of its
        step); the last micro-batch synchronises the accumulated sum once."""
        if not (self.enabled and skip_sync):
            yield
            return
        for m in self.wrapped:
            m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for m in self.wrapped:
                m.set_requires_gradient_sync(True)

    # -- collectives ------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The block runs on each host's local rank 0 first, then on the other ranks (which then find what it
        prepared, e.g. the built-in clips, instead of all building it at once)."""
        if self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.local_rank == 0:
                self.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a stop request must end the same step everywhere)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list in rank order), None elsewhere."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def mean_logs(self, rows: list[tuple[int, dict]]) -> None:
        """Average the logged tensors of `rows` over the ranks, in place (one all-reduce per logging interval)."""
        if not self.enabled or not rows:
            return
        keys = [(i, k) for i, (_, r) in enumerate(rows) for k, v in sorted(r.items()) if isinstance(v, Tensor)]
        if not keys:
            return
        flat = torch.stack([_local(rows[i][1][k]).float().reshape(()) for i, k in keys])
        dist.all_reduce(flat)
        for (i, k), v in zip(keys, (flat / self.world_size).unbind()):
            rows[i][1][k] = v

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """`torch.nn.utils.clip_grad_norm_` that also takes FSDP's sharded gradients: the norm of the full
        gradients (a plain tensor), then the clipping."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        groups = [[p for p in params if p.grad is not None and isinstance(p.grad, DTensor) == sharded]
                  for sharded in (True, False)]
        groups = [g for g in groups if g]
        norms = [_full(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
        for g in groups:  # one call per kind: foreach kernels take sharded or plain tensors, not both
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total)
        return total

    # -- checkpoints ------------------------------------------------------------------------------------------
    def full_weights(self, weights: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
        """The method's weights with FSDP shards gathered into full tensors (collective: every rank calls it)."""
        if not self.sharded:
            return weights
        return {g: {k: _full(v) for k, v in group.items()} for g, group in weights.items()}

    def localize(self, loaded: dict[str, dict[str, Tensor]], live: dict[str, dict[str, Tensor]]
                 ) -> dict[str, dict[str, Tensor]]:
        """Full tensors read from a checkpoint, cut to this rank's shard wherever the live tensor is sharded."""
        if not self.sharded:
            return loaded
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = {}
        for g, group in loaded.items():
            out[g] = {}
            for k, v in group.items():
                target = live.get(g, {}).get(k)
                if isinstance(target, DTensor):
                    v = distribute_tensor(v.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
                out[g][k] = v
        return out

    def save_sharded_optimizers(self, stage_dir: Path, step: int, optimizers: dict, method, models
                                ) -> dict[str, Path]:
        """With FSDP, every rank writes its share of the optimizer state with DCP into a staging folder that
        rank 0 then moves into the checkpoint; returns {"optim": folder} (empty without FSDP)."""
        if not self.sharded:
            return {}
        import torch.distributed.checkpoint as dcp

        staging = stage_dir / f".tmp-optim-{step:07d}"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
        self.barrier()
        dcp.save(_optimizer_states(optimizers, method, models), checkpoint_id=str(staging))
        self.barrier()
        return {"optim": staging}

    def rank_state(self, state: dict) -> dict | None:
        """This rank's RNG and data state from a checkpoint's state.pt, or None when the checkpoint was written
        by another number of ranks (the caller re-derives the streams)."""
        saved = int(state.get("world_size", 1))
        if saved != self.world_size:
            return None
        return state["ranks"][self.rank] if "ranks" in state else state


def load_optimizers(ckpt: Path, optimizers: dict, method, models) -> None:
    """Load optimizer state that FSDP saved sharded with DCP (`optim/`), resharded to the current ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    states = _optimizer_states(optimizers, method, models)
    dcp.load(states, checkpoint_id=str(ckpt / "optim"))
    container = _container(method, models)
    for phase, opt in optimizers.items():
        set_optimizer_state_dict(container, opt, states[phase])


def rescale_loader_state(states: list[dict], world_size: int) -> dict:
    """A data position for one of `world_size` ranks from the states of the ranks that wrote a checkpoint: the
    same epoch, the same fraction of it, and every file any rank found bad."""
    out = dict(states[0])
    if "position" in out:
        out["position"] = int(out["position"]) * len(states) // world_size
    if "skipped" in out:
        out["skipped"] = sorted({p for s in states for p in s.get("skipped", [])})
    return out


_ACTIVE: Distributed | None = None


def active() -> Distributed:
    """The job `setup` joined, or a single process (code that builds its own trainer, like `bench train`)."""
    return _ACTIVE or Distributed()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Inside, `active()` describes a single process although the job goes on (the one-GPU half of
    `bench train --nproc`, timed on rank 0 while the other ranks wait)."""
    global _ACTIVE
    job, _ACTIVE = _ACTIVE, None
    try:
        yield
    finally:
        _ACTIVE = job


def setup(device: torch.device, timeout_s: float = 600.0, parallel: str = "ddp") -> Distributed:
    """Join the job torchrun started (nccl on CUDA, each rank on GPU LOCAL_RANK; gloo on the CPU; every
    collective bounded by `timeout_s`), or describe a single process on `device` when there is none."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed(device=device, parallel=parallel)
    if parallel == "fsdp":
        import inspect

        from torch.distributed.fsdp import fully_shard

        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ValueError(f"--parallel fsdp needs torch >= 2.7 (FSDP2 keeping the frozen weights out of the shards); "
                             f"this is torch {torch.__version__}: upgrade it or use --parallel ddp")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    join = dict(timeout=timeout, store=_attempt_store(world, timeout), rank=rank, world_size=world)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **join)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", **join)
        control = None
    log.info("rank %d of %d on %s (%s, collective timeout %.0f s)", rank, world, device, parallel, timeout_s)
    global _ACTIVE
    _ACTIVE = Distributed(rank, world, local, device, parallel, control)
    return _ACTIVE


def _attempt_store(world: int, timeout: datetime.timedelta):
    """The store that the ranks of a restarted attempt meet in, or None for init_process_group's own (env://).

    torchrun shares its rendezvous store with the workers (TORCHELASTIC_USE_AGENT_STORE) and that store outlives
    a restart with the dead attempt's keys in it, so restarted workers read the dead ranks' addresses and fail or
    hang while connecting (PyTorch issue #135712). A key prefix per attempt keeps them apart; the alternative is to
    launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt)."""
    if restart_count() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"prodistill/attempt-{restart_count()}", agent)


def teardown(ctx: Distributed) -> None:
    global _ACTIVE
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _ACTIVE = None


# -- helpers ------------------------------------------------------------------------------------------------------
def _shard_units(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (elements of ModuleLists that hold trainable parameters, outermost
    first), so only one block's trainable parameters are gathered at a time."""
    units = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            units += [m for m in child if any(p.requires_grad for p in m.parameters())]
        else:
            units += _shard_units(child)
    return units


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _container(method, models) -> nn.Module:
    """The method's trainable networks as one module, so DCP can name optimizer state by parameter name."""
    from prodistill.accel import method_networks

    return nn.ModuleList([n for n in method_networks(method, models) if any(p.requires_grad for p in n.parameters())])


def _optimizer_states(optimizers: dict, method, models) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    container = _container(method, models)
    return {phase: get_optimizer_state_dict(container, opt) for phase, opt in optimizers.items()}
