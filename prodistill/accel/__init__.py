"""Speed-ups of the training step, applied in one place, in one written order, each switchable.

The methods own the math and know nothing of this package; `accelerate` rewires a built method's networks
and its teacher solve. The order matters, and is:

1. FP8 Linear layers (`--fp8`, `prodistill.accel.fp8`): teacher (role `infer`), student and DINOv2 (role
   `train`), each layer only where the measured per-shape table says FP8 wins; first, because layers must be
   swapped before anything traces them. Every call first restores the networks' bf16 layers, so a network
   converted by an earlier call (stage 1, another bench configuration) is converted afresh or not at all.
2. Fused ops (`--fused-ops`): the discriminator's latent upsampler and the pseudo-Huber distance run as the
   `ops/` Triton kernels (custom ops, so compiled regions keep them as single nodes). Off by default: measured
   on an H100 (README), the fused upsampler is 2.2-2.6× slower than eager torch and the fused pseudo-Huber
   within ±10 % of it.
3. Exact rewrites (`--exact-rewrites`, `prodistill.accel.rewrites`): SVD's one-token cross-attention as its
   projected value — the same function with less work; before compile and graphs, which must trace and record
   the rewritten form.
4. Channels-last convolution weights (`--channels-last`, `prodistill.accel.layout`): before compile, so the
   regions are traced on the layout they will run.
5. Activation checkpointing of the student's UNet stages (`--grad-checkpointing`): before compile, so the
   compiled regions contain the recomputation instead of storing activations.
6. Regional `torch.compile` (`--compile`) of teacher, student (and with it the EMA target, which is the
   student with θ⁻ swapped into its parameters), DINOv2 and the discriminator's upsampler and heads — ahead of
   time in `--compile-workers` processes with the variants saved to disk (`prodistill.accel.precompile`), or
   just in time in this process (`--compile-workers 0`, or where this torch or backend cannot save them).
   With `--split-cfg` (auto: on when every network is compiled) the teacher's guided solve runs its CFG as two
   batch-B calls, so the compiled teacher reuses the batch-B graphs of the blocks it shares with the EMA target
   (same classes and shapes, no LoRA): measured on an H200 at 512², 55 variants instead of 79 to compile and
   load, and 0.884 s/it against 0.910 with one batch-2B call.
7. CUDA graphs (`--cuda-graphs`) of the frozen teacher's m-step solve and, in a single process, of the EMA
   target's forward and (`graph_train`, `bench train` configuration `+train-graphs`) of the student's and the
   discriminator's passes with their backward (`prodistill.accel.graphs`): last, because they record whatever the
   steps above made of the networks.

`PRODISTILL_COMPILE_BACKEND` (default `inductor`) names the dynamo backend; tests use `aot_eager` or `eager`
to check tracing and numerics on CPU in seconds. `PRODISTILL_INDUCTOR_OPTIONS` (a JSON object, e.g.
`{"cpp_wrapper": true}`) passes inductor options to every region (`prodistill.accel.compile.inductor_options`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("prodistill")


class SpeedupError(ValueError):
    """A speed-up was asked for where it cannot work."""


@dataclass
class Speedups:
    """What `accelerate` applies (resolved from the config's auto/on/off switches and the device)."""

    compile: str = "off"
    """off, teacher (only the frozen teacher's regions: one forward-only variant, minutes less to compile) or
    all (every network's regions)."""
    cuda_graphs: bool = False
    graph_ema: bool = False
    """With cuda_graphs: the EMA target's forward is a CUDA graph too (single process only: DDP/FSDP forwards
    communicate)."""
    graph_train: bool = False
    """With cuda_graphs: the step's differentiated calls — the student's denoiser and the discriminator's logits — and
    their backward are CUDA graphs too (`prodistill.accel.graphs.GraphedTrainCall`; single process, not with grad
    checkpointing or FP8)."""
    channels_last: bool = False
    rewrites: bool = False
    """`prodistill.accel.rewrites` (single process only: see there)."""
    temporal_gemm: bool = False
    """With rewrites: also the temporal convolutions as GEMMs (experimental, `bench train` configuration
    `compile+graphs+conv-gemm` only)."""
    fused_ops: bool = False
    grad_checkpointing: bool = False
    cache_dir: Path | None = None
    backend: str = field(default_factory=lambda: os.environ.get("PRODISTILL_COMPILE_BACKEND", "inductor"))
    compile_workers: int = 0
    """Processes compiling region variants ahead of time (`prodistill.accel.precompile`); 0: just-in-time
    torch.compile in this process."""
    split_cfg: bool = False
    """The teacher's CFG as two batch-B calls (`guided_denoiser(split=True)`)."""
    fp8: bool = False
    fp8_backend: str = "auto"
    """te, torchao, emulate, or auto (per layer, the installed backend the table finds faster)."""
    fp8_table: Path | None = None
    """The measured per-shape table (None: the one shipped in the package)."""

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "Speedups":
        """`--compile auto` is `all` on CUDA and off on the CPU; `--cuda-graphs auto` is on for CUDA. Asking for
        graphs where they cannot work is an error (raised before any model is built).

        Why auto compiles every network: measured on an H100 (SVD-XT, 512², OSV stage 2, one process each
        line), plain script 1.85 s/it at 39.3 GB; teacher-only compile + graphed solve 1.19-1.21 s/it at 39.3 GB
        with a ~32 s first step; every network compiled + graphed solve 1.09 s/it at 27.7 GB (the only
        configuration under 30 GB) with a 65-70 s first step from a warm compile cache — but more than 8 minutes
        the first time a configuration compiles. `--compile teacher` is the quick-start choice for short runs."""
        cuda = device.type == "cuda"
        if cfg.cuda_graphs == "on" and not cuda:
            raise SpeedupError("--cuda-graphs on needs --device cuda (CUDA graphs exist only on NVIDIA GPUs); "
                               "use --cuda-graphs off or auto on the CPU")
        if cfg.fused_ops and not cuda:
            raise SpeedupError("--fused-ops needs --device cuda (the fused kernels are Triton GPU kernels); the CPU "
                               "always runs the pure-torch ops")
        if cfg.fp8:
            from prodistill.accel.fp8 import check_available

            check_available(cfg.fp8_backend, device)
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        if cfg.exact_rewrites == "on" and not single:
            raise SpeedupError("--exact-rewrites on needs a single process (DDP would wait for the gradients of the "
                               "query/key projections the rewrite skips); use --exact-rewrites auto or off")
        mode = {"auto": "all" if cuda else "off", "on": "all"}.get(cfg.compile, cfg.compile)
        if mode != "off":
            from prodistill.accel.compile import default_cache_dir, inductor_options
            from prodistill.atomic import folder_problem

            try:
                inductor_options()  # a bad $PRODISTILL_INDUCTOR_OPTIONS is one sentence before any model is built
            except ValueError as e:
                raise SpeedupError(str(e)) from None
            problem = folder_problem(cfg.compile_cache or default_cache_dir(), "--compile-cache")
            if problem is not None:
                raise SpeedupError(problem)
        workers = cfg.compile_workers
        if workers < 0:
            workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1
        if cfg.parallel == "fsdp" and not single:
            workers = 0  # FSDP's sharded parameters have no weightless copy to compile from: just in time
        graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda)
        return cls(compile=mode, cuda_graphs=graphs, graph_ema=graphs and single,
                   channels_last=cfg.channels_last, rewrites=cfg.exact_rewrites != "off" and single,
                   fused_ops=cfg.fused_ops, compile_workers=workers,
                   grad_checkpointing=cfg.grad_checkpointing,
                   split_cfg=cfg.split_cfg == "on" or (cfg.split_cfg == "auto" and mode == "all"),
                   cache_dir=Path(cfg.compile_cache).expanduser() if cfg.compile_cache else None,
                   fp8=cfg.fp8, fp8_backend=cfg.fp8_backend,
                   fp8_table=Path(cfg.fp8_table).expanduser() if cfg.fp8_table else None)

    def describe(self) -> str:
        scope = "teacher" if self.compile == "teacher" else "all networks"
        parts = [f"FP8 ({self.fp8_backend}) where measured faster" if self.fp8 else None,
                 f"compile ({scope}, {self.backend})" if self.compile != "off" else None,
                 ("CUDA graphs: teacher solve" + (" + EMA target" if self.graph_ema else "")
                  + (" + student and discriminator passes" if self.graph_train else "")) if self.cuda_graphs
                 else None,
                 ("exact rewrites" + (" (temporal convs as GEMMs too)" if self.temporal_gemm else "")) if self.rewrites
                 else None,
                 "channels-last convs" if self.channels_last else None,
                 "fused ops" if self.fused_ops else None,
                 "grad checkpointing" if self.grad_checkpointing else None,
                 "split CFG" if self.split_cfg else None]
        return ", ".join(p for p in parts if p) or "none (eager)"


def method_networks(method, models) -> list[nn.Module]:
    """The networks a step runs: the teacher and every module the method holds (student, discriminator)."""
    nets = [models.teacher]
    nets += [m for m in vars(method).values() if isinstance(m, nn.Module)]
    return nets


def fp8_networks(method, models, compile_mode: str) -> list[tuple[str, nn.Module, str, bool]]:
    """(name, network, FP8 role, compiled?) of each network with Linear layers FP8 may convert: the frozen
    teacher runs forward only (`infer`); every other network of the method is differentiated through
    (`train`). A network is compiled when `compile_mode` covers it."""
    nets = [("teacher", models.teacher, "infer", compile_mode in ("teacher", "all"))]
    for name, module in vars(method).items():
        if isinstance(module, nn.Module) and module is not models.teacher:
            nets.append((name, module, "train", compile_mode == "all"))
    return nets


def recover_from_oom() -> bool:
    """The trainer's hook after the GPU ran out of memory in a step (`Trainer(on_oom=...)`, single process): while
    region variants compile in the background the steps run eagerly, and an eager step needs more memory than the
    compiled one (measured on an H200: OSV stage 2 at 1024x768 93.8 GB eager vs 58.8 GB compiled, AVDM2 at batch 2
    95.7 vs 60.3), so a run that fits once compiled can run out during its first steps. Waits for the compiler,
    empties the allocator's cache and returns True, so that the step is redone compiled; False when nothing was
    compiling (the step itself does not fit)."""
    from prodistill.accel.precompile import finish_all

    if not finish_all():
        return False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def release_graphs(method) -> int:
    """Reset the CUDA graphs `accelerate` put on `method` (`GraphedCall.reset`), freeing their memory pools; returns
    how many wrappers were reset. The trainer's hook after a `--resolution-schedule` switch."""
    from prodistill.accel.graphs import GraphedCall

    wrappers = [v for v in vars(method).values() if isinstance(v, GraphedCall)]
    for wrapper in wrappers:
        wrapper.reset()
    return len(wrappers)


def start_compile_workers(speedups: Speedups, device: torch.device) -> bool:
    """On a first launch (no variant file in the compile cache yet) of a single process that compiles ahead of time
    in several background processes, start those processes now, before the models are built, so that they have
    imported the compiler and the region classes by the time the first step hands them variants
    (`Precompiler.prewarm`); whether it did. A warm launch starts none: it loads files instead."""
    if speedups.compile == "off" or speedups.compile_workers <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    from prodistill.accel import precompile
    from prodistill.accel.compile import REGION_MODULES, use_cache_dir

    if not precompile.supported(speedups.backend):
        return False
    compiler = precompile.Precompiler.shared(use_cache_dir(speedups.cache_dir), speedups.backend,
                                             speedups.compile_workers)
    if not compiler.cold():
        return False
    compiler.prewarm(str(device), REGION_MODULES)
    return True


def accelerate(method, models, speedups: Speedups) -> list:
    """Apply `speedups` to a built method in the order of this module's docstring. Returns the FP8 plan of
    every Linear layer (`prodistill.accel.fp8.LayerPlan`; empty without `--fp8`), which `explain` lists."""
    from prodistill.accel import fp8

    if speedups.cuda_graphs and speedups.graph_train and (speedups.grad_checkpointing or speedups.fp8):
        raise SpeedupError("CUDA graphs of the training passes (graph_train, +train-graphs) do not work with "
                           "--grad-checkpointing or --fp8; leave one of them off")
    plans = []
    table = fp8.Table.load(speedups.fp8_table) if speedups.fp8 else None
    for name, net, role, compiled in fp8_networks(method, models, speedups.compile):
        if table is None:
            fp8.restore(net)
        else:
            plans += fp8.convert(net, name, role, compiled, speedups.fp8_backend, table)
    if table is not None:
        if speedups.fp8_backend == "te" and speedups.compile != "off":
            log.warning("--fp8-backend te leaves the compiled networks (--compile %s) in bf16: te.Linear is a graph "
                        "break under torch.compile; use --fp8-backend torchao or auto there, or --compile off",
                        speedups.compile)
        converted = sum(p.backend is not None for p in plans)
        log.log(logging.INFO if converted else logging.WARNING, "%s (table: %s%s)", fp8.summary(plans),
                table.source, "" if table.rows else ", which holds no measured row: run `prodistill bench fp8`")
    student = getattr(method, "student", None)
    import ops

    ops.set_default(True if speedups.fused_ops else None)  # the pseudo-Huber distance follows ops' switch
    networks = method_networks(method, models)
    for net in networks:
        for module in net.modules():
            if hasattr(module, "fused") and type(module).__name__ == "LatentUpsampler":
                module.fused = speedups.fused_ops
    from prodistill.accel.layout import set_conv_layout
    from prodistill.accel.precompile import forget_variants
    from prodistill.accel.rewrites import apply_rewrites

    apply_rewrites(networks, speedups.rewrites, temporal_gemm=speedups.temporal_gemm)
    set_conv_layout(networks, speedups.channels_last)
    for net in networks:
        forget_variants(net)  # layers, rewrites or layouts changed: an earlier call's regions have a new structure
    if speedups.grad_checkpointing:
        if not hasattr(student, "enable_gradient_checkpointing"):
            raise SpeedupError("--grad-checkpointing needs a diffusers UNet student")
        student.enable_gradient_checkpointing()
    compiler = None
    if speedups.compile != "off":
        from prodistill.accel import precompile
        from prodistill.accel.compile import compile_regions, use_cache_dir

        cache = use_cache_dir(speedups.cache_dir)
        nets = [models.teacher] if speedups.compile == "teacher" else networks
        if speedups.compile_workers > 0 and precompile.supported(speedups.backend):
            compiler = precompile.Precompiler.shared(cache, speedups.backend, speedups.compile_workers)
            compiler.checkpoint_waiting = not speedups.grad_checkpointing
            regions = compile_regions(nets, backend=speedups.backend, wrap=compiler.wrap)
            how = f"ahead of time, {speedups.compile_workers} process(es)"
        else:
            regions = compile_regions(nets, backend=speedups.backend)
            how = "just in time"
        log.info("compiling %d regions with %s, %s (cache: %s); the first steps include compile time",
                 len(regions), speedups.backend, how, cache)
    if hasattr(method, "teacher_solve") and hasattr(method.teacher_solve, "split_cfg"):
        method.teacher_solve.split_cfg = speedups.split_cfg
    if speedups.cuda_graphs:
        from prodistill.accel.graphs import GraphedCall, GraphedSolve, GraphedTrainCall

        background = compiler is not None and compiler.workers > 1
        hooks = dict(before_capture=compiler.flush if compiler else None,
                     ready=(lambda: not compiler.pending()) if background else None)
        if hasattr(method, "teacher_solve"):
            method.teacher_solve = GraphedSolve(method.teacher_solve, **hooks)
        if speedups.graph_ema and getattr(method, "ema_d", None) is not None:
            method.ema_d = GraphedCall(method.ema_d, name="EMA target", **hooks)
        if speedups.graph_train and hasattr(method, "student_d"):
            trainable = getattr(method, "trainable", None)
            params = (lambda: trainable.values()) if trainable is not None else student.parameters
            method.student_d = GraphedTrainCall(method.student_d, params, **hooks)
        disc = getattr(method, "disc", None)
        if speedups.graph_train and hasattr(method, "disc_logits") and isinstance(disc, nn.Module):
            # the discriminator update judges real and fake before its backward: two captures of that signature
            method.disc_logits = GraphedTrainCall(method.disc_logits, disc.parameters, name="discriminator", slots=2,
                                                  **hooks)
    return plans

