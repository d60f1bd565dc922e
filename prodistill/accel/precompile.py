"""Ahead-of-time compiled regions: each region variant compiled once, in parallel processes, saved to disk, and
loaded by later launches without dynamo tracing it again.

Why: with `torch.compile` (just in time) every launch re-traces every region variant in dynamo — measured
65-70 s before the first step of a warm launch of SVD-XT at 512² on an H100 — and a cold launch compiles its
~60 variants one after another in one Python process (more than 7.5 minutes). Here a variant is a region
class with one structure (parameter shapes, dtypes, attributes) called with one input signature (shapes,
strides, dtypes, requires_grad, grad mode, autocast); variants are compiled with dynamo's AOT entry point
(`torch._dynamo.aot_compile.aot_compile_fullgraph`, fullgraph, static shapes) and saved with their guards as
one file per variant under the compile cache. A later launch loads the file (no tracing) and checks its guards
once per module and signature.

How a launch goes: the first call of an unknown variant runs eagerly and queues the variant. With more than
one worker (`workers`, the GPU default) the variant is handed at once to a pool of spawned processes that
compile in the background while the training steps go on eagerly: each call of a waiting variant runs eagerly
until its file is written, then loads it (`pending` tells the CUDA-graph capture of the teacher's solve to
wait until nothing is left to compile, so the graph records compiled regions). With one worker the queue is
compiled in this process (`flush`) when a queued variant is called again (the second UNet call of the
teacher's solve, the second training step) or when the graph capture asks for it. While a UNet region waits, its
differentiated eager calls are activation-checkpointed (`Precompiler.checkpoint_waiting`, on by default): an
eager step stores every intermediate of every block for its backward — on an H100 at 512² the eager steps of a cold
launch peaked at 34.9 GB against the compiled step's 23.7 — and recomputing a waiting block's forward in the
backward keeps only its inputs, with the same values and gradients. A worker is given a
weightless copy of the region (parameters on the meta device, materialised empty there: compiling needs
shapes, not values) and empty inputs of the recorded signature.

Autocast: the step calls regions inside `torch.autocast`; dynamo's serialised guards of torch 2.11-2.13 expect
the inputs' dispatch keys without the autocast key while its global-state guard expects autocast on, so a
region compiled under an outer autocast never passes its guards after loading. Each variant is therefore
compiled as `region_forward(module, device_type, dtype, enabled, ...)`, which enters the recorded autocast
*inside* the graph, and called with the outer autocast switched off.

Guards dropped before saving (dynamo cannot serialise them): identity of global and code objects (diffusers'
`Attention` inspects its processor's signature at every call) and of nn.Module instances — the file is
meant for every module of its structure. A variant whose compilation or loading fails runs through
`torch.compile` in this process instead, with one warning.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import importlib
import itertools
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prodistill.accel.compile import compile_fn, inductor_options

log = logging.getLogger("prodistill")

FORMAT = 1
"""Bumped when what a file holds changes, so stale files are not loaded."""

_UNSERIALISABLE = {"DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
                   "CLOSURE_MATCH", "WEAKREF_ALIVE"}


def region_forward(module: nn.Module, device_type: str, dtype: torch.dtype, enabled: bool, *args, **kwargs):
    """The compiled function of every variant: the region's own forward under the caller's autocast state."""
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return type(module).forward(module, *args, **kwargs)


_COVERED_BY_KEY = {"GLOBAL_STATE", "TENSOR_MATCH"}


def _guard_filter(entries) -> list[bool]:
    """Keep the guards a file can carry and that hold for every module of its variant. Also dropped, because
    this module checks the same facts itself: dynamo's global-state guard (grad mode, every device's autocast
    flag and dtype, thread count, TF32 and determinism flags) — the call key carries grad mode and the region's
    autocast state, the file name the flags that change the code (`_global_flags`), and the thread count
    differs between the compiling worker and the training process without changing what is computed — and
    the tensor guards (shape, stride, dtype, device, requires_grad of every input and parameter) — carried by
    the call key and the module's `structure`. Measured on torch 2.13 (CPU, bf16 autocast) and 2.11 (H100):
    the serialised tensor guards also compare each tensor's dispatch keys with an autocast key that depends on
    where the variant was compiled, and failed on every loaded file; dynamo's own guards are therefore not the
    check here."""
    return [not (e.is_global or e.guard_type in _UNSERIALISABLE or e.guard_type in _COVERED_BY_KEY
                 or any(t in _UNSERIALISABLE for t in e.derived_guard_types)) for e in entries]


def _global_flags() -> tuple:
    return (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)


def supported(backend: str) -> bool:
    """Whether this torch has dynamo's AOT entry point and `backend` produces serialisable code."""
    try:
        from torch._dynamo.aot_compile import aot_compile_fullgraph  # noqa: F401
    except ImportError:
        return False
    return backend in ("inductor", "aot_eager") and hasattr(torch.compiler, "load_compiled_function")


# -- what identifies a variant ------------------------------------------------------------------------------

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _meta(value: Any) -> Any:
    """A hashable description of a call argument: tensors by their metadata, plain values as themselves."""
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_meta(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _meta(v)) for k, v in value.items()))
    if isinstance(value, _PLAIN):
        return value
    raise TypeError(f"cannot precompile a region called with a {type(value).__name__}")


def _autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


def _device(module: nn.Module, args: tuple = ()) -> torch.device:
    """Where a region runs: its first parameter's (or buffer's, or input tensor's) device."""
    for t in (*module.parameters(), *module.buffers(), *(a for a in args if isinstance(a, Tensor))):
        return t.device
    return torch.device("cpu")


def call_key(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The signature of one call: inputs' metadata, grad mode, autocast state, train/eval. The autocast state is
    read for the first input tensor's device (the module's where no input is a tensor): walking the module's
    parameters costs ~45 µs per call of an SVD-XT res-block, on the CPU-bound path that launches the student."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    device_type = first.device.type if first is not None else _device(module).type
    return (_meta(args), _meta(kwargs), torch.is_grad_enabled(), _autocast_state(device_type), module.training)


def structure(module: nn.Module) -> tuple:
    """What a compiled region's code depends on besides its inputs: the classes of its modules, their plain
    attributes, and the metadata of every parameter and buffer (shape, strides — channels-last weights compile to
    other code —, dtype; not their values)."""
    parts = []
    for name, sub in module.named_modules():
        attrs = tuple(sorted((k, v if not isinstance(v, (list, tuple)) else tuple(v)) for k, v in vars(sub).items()
                             if not k.startswith("_") and (isinstance(v, _PLAIN)
                                                           or (isinstance(v, (list, tuple))
                                                               and all(isinstance(x, _PLAIN) for x in v)))))
        parts.append((name, type(sub).__module__, type(sub).__qualname__, attrs,
                      tuple(type(p).__qualname__ for p in (getattr(sub, "processor", None),) if p is not None)))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        parts.append((name, tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, t.requires_grad))
    return tuple(parts)


def _fingerprint(module: nn.Module, key: tuple, backend: str) -> str:
    device = _device(module)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    options = tuple(sorted(inductor_options().items())) if backend == "inductor" else ()
    text = repr((FORMAT, torch.__version__, backend, options, capability, _global_flags(), structure(module), key))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# -- compiling one variant (in this process or a worker) -----------------------------------------------------

@dataclass
class Job:
    path: str
    module: nn.Module
    """A weightless copy of the region (meta tensors)."""
    args: tuple
    kwargs: dict
    grad: bool
    autocast: tuple[str, torch.dtype, bool]
    device: str
    backend: str
    flags: tuple
    """`_global_flags()` of the training process, set in the worker before compiling."""
    options: dict
    """`inductor_options()` of the training process."""


def expected_cost(job: Job) -> tuple:
    """Sort key of a background variant, the one expected to take longest to compile first: a differentiated
    variant (a forward and a backward graph) before a forward-only one, then more parameter tensors (more layers,
    LoRA factors) first. A guess from what a variant holds, not a measurement: on session 20's H100, past each
    process's first variant, SVD-XT's forward-only res-blocks and attention models took 4.1-9.7 s and a training
    step's mix of variants up to 13.9 s."""
    params = list(job.module.parameters())
    inputs = [t for t in _tensors((job.args, job.kwargs)) if t.requires_grad]
    differentiated = job.grad and (bool(inputs) or any(p.requires_grad for p in params))
    return (not differentiated, -len(params))


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _WarmUpRegion(nn.Module):
    """A tiny region of the layer kinds the real ones hold (norm, SiLU, convolution, Linear), compiled once by each
    background process as it starts."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv, self.proj = nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(nn.functional.silu(self.norm(x)))
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


def _warm_up(device: str, modules: tuple[str, ...], backend: str, options: dict) -> float:
    """(In a worker, as it starts.) Import `modules` (the region classes) and compile a tiny differentiated region
    on `device` through `compile_job`, as a variant would be, into a throw-away file: the seconds a process's first
    variant otherwise spends on imports, the CUDA context, inductor's own compile processes and the first kernel
    build (measured on an H100 for the teacher's forward-only variants: each process's first res-block or
    attention model took 13.1-19.1 s, later ones 4.1-9.7 s). Returns the seconds it took."""
    start = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    x = torch.empty(1, 8, 4, 4, device="meta", requires_grad=True)
    with tempfile.TemporaryDirectory() as folder:
        compile_job(Job(os.path.join(folder, "warm-up.aot"), _skeleton(_WarmUpRegion()), (x,), {}, True,
                        (device.split(":")[0], torch.bfloat16, True), device, backend, _global_flags(), options))
    return time.perf_counter() - start


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are meta tensors (same shapes, dtypes, requires_grad),
    without this package's wrapper on its forward."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    forward = vars(module).pop("forward", None)
    try:
        return copy.deepcopy(module, memo)
    finally:
        if forward is not None:
            module.forward = forward


def _to_meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device="meta").requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _materialise(value: Any, device: str) -> Any:
    if isinstance(value, Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device=device).requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _materialise(v, device) for k, v in value.items()}
    return value


def _backend(name: str, options: dict):
    if name == "inductor":
        return torch._TorchCompileInductorWrapper(None, options or None, False)
    return torch._TorchCompileWrapper(name, None, None, False)


def compile_job(job: Job) -> float:
    """Compile one variant and write its file (atomically); returns the seconds it took."""
    from torch._dynamo.aot_compile import aot_compile_fullgraph
    from torch._dynamo.hooks import Hooks

    start = time.perf_counter()
    module = job.module.to_empty(device=job.device)
    args, kwargs = _materialise(job.args, job.device), _materialise(job.kwargs, job.device)
    for name, value in zip(("matmul", "cudnn", "bf16", "fp16"), job.flags[2:]):
        _set_flag(name, value)
    torch.use_deterministic_algorithms(job.flags[1])
    with torch.set_grad_enabled(job.grad), torch.autocast(job.autocast[0], enabled=False):
        compiled = aot_compile_fullgraph(region_forward, ((module, *job.autocast, *args), kwargs),
                                         hooks=Hooks(guard_filter_fn=_guard_filter),
                                         backend=_backend(job.backend, job.options), dynamic=False)
    data = type(compiled).serialize(compiled).serialized_data
    tmp = f"{job.path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, job.path)
    return time.perf_counter() - start


def _set_flag(name: str, value: bool) -> None:
    if name == "matmul":
        torch.backends.cuda.matmul.allow_tf32 = value
    elif name == "cudnn":
        torch.backends.cudnn.allow_tf32 = value
    elif name == "bf16":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = value
    else:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = value


def _compile_in_worker(job_file: str) -> float:
    job = torch.load(job_file, weights_only=False)
    return compile_job(job)


def _guard_failure(fn, args: tuple, kwargs: dict) -> str:
    """The first failing guard of `fn` on this call, as dynamo words it (best effort: private API)."""
    try:
        info = fn._artifacts.guard_manager.check_verbose(fn.prepare_f_locals(*args, **kwargs))
        return "; ".join(info.verbose_code_parts)[:500]
    except Exception:
        return "reason unavailable"


def _load(path: str):
    """The compiled function saved in `path`. (torch deep-copies each loaded AOT-autograd entry so that the function
    could be saved again; skipping that copy was tried in session 17 and measured no faster on an H200: README.)"""
    with open(path, "rb") as f:
        return torch.compiler.load_compiled_function(f)


# -- the regions' calls ----------------------------------------------------------------------------------------

class RegionCall:
    """Replaces a region's `forward`: dispatches each call to its variant's compiled function, or runs eagerly
    while the variant waits to be compiled."""

    def __init__(self, compiler: "Precompiler", module: nn.Module):
        self.compiler, self.module = compiler, module
        self.variants: dict[tuple, Any] = {}
        self.fallback = None
        self._prodistill_owner = module

    def __call__(self, *args, **kwargs):
        key = call_key(self.module, args, kwargs)
        fn = self.variants.get(key)
        if fn is None:
            fn = self.compiler.resolve(self, key, args, kwargs)
        if fn == "eager":
            if self.compiler.checkpoint_waiting and _recomputable(self.module, args, kwargs):
                return checkpoint(type(self.module).forward, self.module, *args, use_reentrant=False, **kwargs)
            return type(self.module).forward(self.module, *args, **kwargs)
        if fn == "jit":
            if self.fallback is None:
                self.fallback = compile_fn(type(self.module).forward.__get__(self.module), self.compiler.backend)
            return self.fallback(*args, **kwargs)
        device_type, dtype, enabled = key[3]
        with torch.autocast(device_type, enabled=False):
            return fn(self.module, device_type, dtype, enabled, *args, **kwargs)


CHECKPOINTED_WHILE_WAITING = ("SpatioTemporalResBlock", "TransformerSpatioTemporalModel")
"""The region classes whose differentiated eager calls are checkpointed while their variant compiles: the UNet's
blocks, where an eager step's activations are (the samplers, DINOv2 and the discriminator keep theirs: little
memory)."""


def _recomputable(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled() or type(module).__name__ not in CHECKPOINTED_WHILE_WAITING:
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


_SHARED: dict[tuple[str, str], "Precompiler"] = {}


def forget_variants(network: nn.Module) -> None:
    """Make every ahead-of-time wrapped region of `network` look up its variants afresh: after its layers were
    swapped (FP8 conversion, or its undoing), a cached compiled function may belong to another structure."""
    for module in network.modules():
        call = vars(module).get("forward")
        if isinstance(call, RegionCall):
            call.variants.clear()
            call.fallback = None


def finish_background() -> int:
    """At the end of a run: wait for the variants still compiling in background processes (a short run can end
    before its first compile does), so that the next launch loads them instead of compiling them again; how many
    there were. Variants queued for this process's own compiler (one worker) are left to the next launch."""
    busy = [c for c in _SHARED.values() if c.pending()]
    count = sum(len(c.futures) for c in busy)
    if count:
        log.info("training is done; %d region variants are still compiling in the background: waiting for them so "
                 "that the next launch loads them (Ctrl-C skips this)", count)
    for compiler in busy:
        compiler.flush()
    return count


def finish_all() -> bool:
    """Compile, or wait for, every variant this process's compilers still have queued or under way (`flush`);
    whether there were any."""
    busy = [c for c in _SHARED.values() if c.queue or c.pending()]
    for compiler in busy:
        compiler.flush()
    return bool(busy)


class Precompiler:
    """Owns the variant files of one cache folder and the variants still to compile: a queue compiled in this
    process (one worker) or a pool of worker processes compiling in the background (more than one)."""

    def __init__(self, cache_dir: Path, backend: str = "inductor", workers: int = 0):
        self.folder = Path(cache_dir) / "aot"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.backend, self.workers = backend, workers
        self.loaded: dict[str, Any] = {}
        self.failed: set[str] = set()
        self.queue: dict[str, Job] = {}
        self.waiting: dict[str, list[tuple[RegionCall, tuple]]] = {}
        self.futures: dict[str, Future] = {}
        self.pool: ProcessPoolExecutor | None = None
        self._batch: dict = {}
        """The background batch under way: its start time and size, for the log line when it ends."""
        self._done_at: dict[str, float] = {}
        """When each background variant finished (set by the pool's thread; read when its result is collected)."""
        self.stats = {"loaded": 0, "compiled": 0, "compile_s": 0.0, "load_s": 0.0, "failed": 0, "variants": []}
        """Counters, and per compiled variant its file, its own compile seconds and when it was ready (seconds
        after its batch began), which tell what a cold start waits for; a batch's log line names the slowest."""
        self.checkpoint_waiting = True
        """Activation-checkpoint the differentiated eager calls of UNet regions while they wait (module docstring);
        `accelerate` turns it off under `--grad-checkpointing`, which checkpoints the UNet's stages already."""
        self._held: list[tuple] = []
        """Background variants not yet handed to the pool: a heap, most expensive first (`expected_cost`)."""
        self._running = 0
        self._cv = threading.Condition()
        self._order = itertools.count()
        self._queued_at: dict[str, float] = {}

    @classmethod
    def shared(cls, cache_dir: Path, backend: str = "inductor", workers: int = 0) -> "Precompiler":
        """The one compiler of this process for a cache folder and backend, so that networks accelerated at
        different times (the teacher shared by several `bench train` configurations) wait on one another's
        background work and load each file once."""
        key = (str(Path(cache_dir).resolve()), backend)
        compiler = _SHARED.get(key)
        if compiler is None:
            compiler = _SHARED[key] = cls(cache_dir, backend, workers)
        compiler.workers = workers
        return compiler

    def wrap(self, regions: list[nn.Module]) -> None:
        for module in regions:
            if getattr(vars(module).get("forward"), "_prodistill_owner", None) is module:
                continue
            module.forward = RegionCall(self, module)

    def resolve(self, call: RegionCall, key: tuple, args: tuple, kwargs: dict):
        """The compiled function of `call`'s variant `key`; "eager" while it waits to be compiled, "jit" when it
        could not be precompiled."""
        path = str(self.folder / f"{type(call.module).__name__}-{_fingerprint(call.module, key, self.backend)}.aot")
        if path in self.futures:
            if not self.futures[path].done():
                return self._wait(path, call, key)
            self._collect()
        if path in self.queue:
            if (call, key) not in self.waiting[path]:  # another module of the same variant: it waits too
                return self._wait(path, call, key)
            self.flush()  # this module calls its variant again (next UNet call, next step): compile the queue now
        if path in self.failed:
            fn = "jit"
        elif path in self.loaded or os.path.exists(path):
            fn = self._checked(call, path, key, args, kwargs)
        else:
            try:
                job = Job(path, _skeleton(call.module), _to_meta(args), _to_meta(kwargs), key[2], key[3],
                          str(_device(call.module, args)), self.backend, _global_flags(),
                          inductor_options() if self.backend == "inductor" else {})
            except Exception as e:  # a module with no weightless copy (e.g. a tensor subclass weight)
                log.warning("cannot precompile %s (%s: %s); compiling it just in time", type(call.module).__name__,
                            type(e).__name__, e)
                self.failed.add(path)
                self.stats["failed"] += 1
                call.variants[key] = "jit"
                return "jit"
            if self.workers > 1:
                self._submit(path, job)
            else:
                self.queue[path] = job
            return self._wait(path, call, key)
        call.variants[key] = fn
        return fn

    def _wait(self, path: str, call: RegionCall, key: tuple) -> str:
        waiting = self.waiting.setdefault(path, [])
        if (call, key) not in waiting:
            waiting.append((call, key))
        return "eager"

    def _checked(self, call: RegionCall, path: str, key: tuple, args: tuple, kwargs: dict):
        try:
            if path not in self.loaded:
                if not self.loaded:
                    log.info("loading region variants compiled earlier from %s (no compiling for those)", self.folder)
                start = time.perf_counter()
                self.loaded[path] = _load(path)
                self.stats["load_s"] += time.perf_counter() - start
                self.stats["loaded"] += 1
            fn = self.loaded[path]
            device_type, dtype, enabled = key[3]
            with torch.autocast(device_type, enabled=False):
                call_args = (call.module, device_type, dtype, enabled, *args)
                if fn.guard_check(*call_args, **kwargs):
                    return fn
                reason = _guard_failure(fn, call_args, kwargs)
            log.warning("precompiled %s does not fit %s (its guards fail: %s); compiling it just in time",
                        Path(path).name, type(call.module).__name__, reason)
        except Exception as e:  # a file of another torch, a truncated file: compile just in time instead
            log.warning("could not load precompiled %s (%s: %s); compiling it just in time", Path(path).name,
                        type(e).__name__, e)
        self.failed.add(path)
        return "jit"

    def pending(self) -> bool:
        """Whether variants are still being compiled in the background (their calls run eagerly meanwhile)."""
        if self.futures and all(f.done() for f in self.futures.values()):
            self._collect()
        if not self.futures and self.pool is not None:
            self.close()  # a prewarmed pool that got no variant: the cache held them all
        return bool(self.futures)

    def flush(self) -> None:
        """Compile every queued variant now (one worker), or wait for the background pool to finish (several),
        and forget the eager placeholders, so that the next call of each loads its file."""
        if self.futures:
            log.info("waiting for %d region variants still compiling in the background...", len(self.futures))
            for _ in _progress(self._as_done(), len(self.futures)):
                pass
            self._collect()
        if not self.queue:
            return
        jobs, self.queue = self.queue, {}
        start = time.perf_counter()
        log.info("compiling %d region variants ahead of time in this process (files in %s)...", len(jobs),
                 self.folder)
        errors = {}
        for path, job in _progress(jobs.items(), len(jobs)):
            try:
                self._timed(path, compile_job(job), time.perf_counter() - start)
            except Exception as e:
                errors[path] = f"{type(e).__name__}: {e}"
        self._finish(list(jobs), errors, time.perf_counter() - start)

    def _as_done(self):
        remaining = set(self.futures.values())
        while remaining:
            done, remaining = wait(remaining, return_when="FIRST_COMPLETED")
            yield from done

    def cold(self) -> bool:
        """Whether the cache folder holds no variant file yet (a first launch on it)."""
        return not any(self.folder.glob("*.aot"))

    def prewarm(self, device: str, modules: tuple[str, ...] = ()) -> None:
        """Start the background processes now and have each warm up (`_warm_up`: imports, CUDA context, one tiny
        compile), so that the first variant handed to a worker compiles as fast as later ones. Meant for a first
        launch on an empty cache, before the models are built; a pool still idle when the steps ask whether
        anything is pending is stopped."""
        if self.workers <= 1 or self.pool is not None:
            return
        self._start_pool()
        options = inductor_options() if self.backend == "inductor" else {}
        for _ in range(self.workers):
            with self._cv:
                self._running += 1  # a warming process is busy: variants wait in the queue, longest first
            warm_up = self.pool.submit(_warm_up, device, tuple(modules), self.backend, options)
            warm_up.add_done_callback(lambda future, pool=self.pool: self._warmed(pool, future))

    def _warmed(self, pool: ProcessPoolExecutor, future: Future) -> None:
        """(The pool's thread.) A process finished warming up: its slot is free. (A pool already closed stopped
        its processes: nothing to say.)"""
        current = self.pool is pool
        self._free(pool)
        if current and not future.cancelled() and future.exception() is not None:
            e = future.exception()
            log.warning("warming up a background compile process failed (%s: %s); its first variant compiles "
                        "without it", type(e).__name__, e)

    def _start_pool(self) -> None:
        """The worker processes (started by the pool as work reaches it; each runs inductor's default number of
        compile threads) and the feeder thread that hands them the held variants."""
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(os.getpid(),))
        _close_at_exit(self)
        threading.Thread(target=self._feed, args=(self.pool,), name="prodistill-precompile", daemon=True).start()

    def _submit(self, path: str, job: Job) -> None:
        """Queue `job` for the pool. Variants are handed to it no faster than its processes take them, most
        expensive first (`expected_cost`), so that the longest compilations do not start last: a cold launch
        waits for the last variant to be ready."""
        if self.pool is None:
            self._start_pool()
        if not self._batch:
            self._batch = {"start": time.perf_counter(), "size": 0, "first": len(self.stats["variants"])}
            log.info("compiling region variants ahead of time in %d background processes (files in %s); the "
                     "steps run eagerly until they are ready", self.workers, self.folder)
        self._batch["size"] += 1
        torch.save(job, _job_file(path))
        self._queued_at[path] = time.perf_counter()
        self.futures[path] = future = Future()
        with self._cv:
            heapq.heappush(self._held, (expected_cost(job), next(self._order), path, future))
            self._cv.notify()

    def _feed(self, pool: ProcessPoolExecutor) -> None:
        """The pool's feeder thread: hands the most expensive held variant to the pool whenever fewer than
        `workers` are under way. Once the pool cannot take work (shut down, broken by a process that died, or a
        process that could not start), every variant held then or later fails at once — each compiles just in
        time — until the pool is replaced (`close`, when nothing is left under way)."""
        broken = None
        while True:
            with self._cv:
                while self.pool is pool and (not self._held or (broken is None and self._running >= self.workers)):
                    self._cv.wait()
                if self.pool is not pool:
                    return
                if broken is None:
                    *_, path, future = heapq.heappop(self._held)
                    self._running += 1
                    failing = [future]
                else:
                    failing, self._held = [entry[-1] for entry in self._held], []
            if broken is None:
                try:
                    work = pool.submit(_compile_in_worker, _job_file(path))
                except Exception as e:
                    broken = e
                    self._free(pool)
                else:
                    work.add_done_callback(lambda work, path=path, future=future:
                                           self._finished(pool, path, future, work))
                    continue
            for future in failing:
                future.set_exception(broken)

    def _free(self, pool: ProcessPoolExecutor) -> None:
        with self._cv:
            if self.pool is pool:  # (a pool already closed has no slots to free)
                self._running -= 1
                self._cv.notify()

    def _finished(self, pool: ProcessPoolExecutor, path: str, future: Future, work: Future) -> None:
        """(The pool's thread.) Note when `path` was ready, free its slot and pass its outcome on."""
        self._done_at[path] = time.perf_counter()
        self._free(pool)
        if work.cancelled():
            future.set_exception(RuntimeError("the compile pool was shut down"))
        elif work.exception() is not None:
            future.set_exception(work.exception())
        else:
            future.set_result(work.result())

    def _collect(self) -> None:
        """Take in the finished background compilations; when none is left, log the batch and free the pool."""
        errors, finished = {}, []
        for path, future in list(self.futures.items()):
            if not future.done():
                continue
            del self.futures[path]
            Path(_job_file(path)).unlink(missing_ok=True)
            finished.append(path)
            if future.exception() is not None:
                e = future.exception()
                errors[path] = f"{type(e).__name__}: {e}"
            else:
                done_at = self._done_at.pop(path, time.perf_counter())
                queued_at = self._queued_at.pop(path, self._batch["start"])
                self._timed(path, future.result(), done_at - self._batch["start"],
                            queued_at - self._batch["start"])
        if finished:
            self._finish(finished, errors, None)
        if not self.futures and self._batch:
            wall = time.perf_counter() - self._batch["start"]
            self.stats["compile_s"] += wall
            log.info("compiled %d region variants in the background in %.1f s%s", self._batch["size"], wall,
                     slowest(self.stats["variants"][self._batch["first"]:]))
            self._batch = {}
            self.close()

    def _timed(self, path: str, seconds: float, ready_after: float, queued_after: float = 0.0) -> None:
        self.stats["variants"].append({"file": Path(path).name, "compile_s": round(seconds, 2),
                                       "queued_after_s": round(queued_after, 2),
                                       "ready_after_s": round(ready_after, 2)})

    def _finish(self, paths: list[str], errors: dict[str, str], wall: float | None) -> None:
        for path, error in errors.items():
            log.warning("precompiling %s failed (%s); it is compiled just in time instead", Path(path).name, error)
            self.failed.add(path)
            self.stats["failed"] += 1
        self.stats["compiled"] += len(paths) - len(errors)
        if wall is not None:
            self.stats["compile_s"] += wall
            log.info("compiled %d region variants in %.1f s", len(paths) - len(errors), wall)
        for path in paths:
            for call, key in self.waiting.pop(path, []):
                call.variants.pop(key, None)

    def close(self) -> None:
        """Stop the worker processes (at the end of a batch, or with compilations cut short at exit)."""
        if self.pool is None:
            return
        with self._cv:
            pool, self.pool = self.pool, None
            busy = self._running > 0  # variants, or warm-ups, under way
            self._held.clear()
            self._running = 0
            self._cv.notify_all()  # the feeder thread sees its pool gone and ends
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        if busy or self.futures:  # cut short: the workers would otherwise finish their work before the exit
            for process in processes:
                process.terminate()
            for path in self.futures:
                Path(_job_file(path)).unlink(missing_ok=True)
            self.futures = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def slowest(variants: list[dict], n: int = 3) -> str:
    """'; slowest: ...' naming the `n` variants that took longest to compile (region class, seconds, when it was
    ready), for a log line; '' for none."""
    top = sorted(variants, key=lambda v: -v["compile_s"])[:n]
    return "; slowest: " + ", ".join(f"{v['file'].split('-')[0]} {v['compile_s']:.1f} s (ready at "
                                     f"{v['ready_after_s']:.1f} s)" for v in top) if top else ""


def _start_worker(parent: int) -> None:
    """(Each worker process, as it starts.) Leave Ctrl-C to the training process, which stops its workers when it
    stops (a terminal sends SIGINT to the whole process group: the workers' warm-ups and compilations would fail
    with tracebacks while the training process finishes its step); and exit when the training process is gone —
    killed, so that it could not stop them — rather than finish a compilation nobody waits for, holding a CUDA
    context."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="prodistill-parent-watch", daemon=True).start()


def _job_file(path: str) -> str:
    """Where a variant's job waits for its worker: per process, as ranks of one run share the compile cache."""
    return f"{path}.{os.getpid()}.job"


def _close_at_exit(compiler: Precompiler) -> None:
    """Stop `compiler`'s workers when the interpreter exits (an interrupted run): before concurrent.futures'
    own exit hook, which would wait for every running compilation to end (threading's exit hooks run last
    registered first)."""
    ref = weakref.ref(compiler)

    def close():
        if (c := ref()) is not None:
            c.close()

    register = getattr(threading, "_register_atexit", None)
    if register is None:
        return
    try:
        register(close)
    except RuntimeError:  # already exiting
        pass


def _progress(items, total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="compiling regions", unit="variant", leave=False)
