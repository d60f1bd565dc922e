"""Calls of the training step replayed as CUDA graphs: the frozen teacher's m-step guided solve
(OSV eq. 8) and the EMA target f_θ⁻.

The solve is the step's largest block of work (m = 5 guided UNet calls: measured on an H200 at 512², 600 ms of
a 1.0 s compiled step) and the best candidate for graph capture: the teacher is frozen (no autograd state), the
loop length m is static, σ values are tensors, and nothing in it draws random numbers (the noise ε is drawn by
the method before the call). One capture records every kernel of the m steps; a replay launches them all with no
Python, no dynamo guard checks and no per-kernel launch overhead. The EMA target is one no-grad student call with
θ⁻ copied into the student's parameters (`prodistill.training.ema`): every tensor it reads keeps its storage
between steps (the optimiser and the EMA update work in place), so its graph replays the current θ⁻ each step;
eagerly it left the GPU idle most of its time (CPU-bound: 160 ms of wall time for 72 ms of kernels, profiled).

Static buffers: the call's tensor arguments (tensors, or dataclasses of tensors such as `SVDCondition`) are copied
into tensors owned by the graph before each replay, and the result is copied out, so callers see an ordinary
function. One graph is kept per input signature (shapes and dtypes); all graphs of a wrapper share one pool.

`GraphedTrainCall` (experimental, `Speedups.graph_train`) does the same for the differentiated calls — the
student's forward, launched from Python, took 186-240 ms of CPU for 56 ms of kernels in the profiled H200 steps,
and the discriminator 83 ms for 3 ms — with a second graph for their backward.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, fields, is_dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

log = logging.getLogger("prodistill")

Solve = Callable[[Tensor, Tensor, object, Tensor], Tensor]


class GraphedCall:
    """A drop-in for a forward-only `fn(*args)` on CUDA, each argument a tensor or a dataclass of tensors, that
    captures it once per input signature and replays it. `before_capture` runs after the first warm-up call, so
    that what that call prepared (ahead-of-time compiled regions) is what the graph records. With `ready` (regions
    compiled in the background), the first call of a signature runs eagerly, and so does every later one until
    `ready()` says nothing is left to compile: the steps go on while the compiler works, and the graph is captured
    once, from compiled regions."""

    max_graphs = 4
    """Signatures kept; past that (a training run has one or two) calls run eagerly, with one warning."""

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2, before_capture: Callable[[], None] | None = None,
                 ready: Callable[[], bool] | None = None, name: str = "call"):
        self.fn, self.warmup, self.before_capture, self.ready, self.name = fn, warmup, before_capture, ready, name
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        self.pool = None
        self._warned = False

    def reset(self) -> None:
        """Forget every captured graph and its memory pool (a resolution switch: the old shapes never return); the
        next call of each signature warms up and captures again."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    @staticmethod
    def _flatten(args: tuple) -> tuple[tuple, list[Tensor]]:
        """(the arguments' structure: None for a tensor, the dataclass type otherwise; their tensors in order)."""
        structure, tensors = [], []
        for a in args:
            if is_dataclass(a):
                structure.append(type(a))
                tensors += [getattr(a, f.name) for f in fields(a)]  # not astuple: it deep-copies (clones) tensors
            else:
                structure.append(None)
                tensors.append(a)
        return tuple(structure), tensors

    @staticmethod
    def _rebuild(structure: tuple, tensors: list[Tensor]) -> list:
        args, i = [], 0
        for kind in structure:
            if kind is None:
                args.append(tensors[i])
                i += 1
            else:
                n = len(fields(kind))
                args.append(kind(*tensors[i:i + n]))
                i += n
        return args

    def __call__(self, *args) -> Tensor:
        structure, inputs = self._flatten(args)
        key = self._key(structure, inputs)
        entry = self.graphs.get(key)
        if entry is None and self._due(key, inputs):
            entry = self.graphs[key] = self._capture(structure, inputs)
        if entry is None:
            return self.fn(*args)
        graph, static_in, static_out = entry
        for buf, t in zip(static_in, inputs):
            buf.copy_(t)
        graph.replay()
        return static_out.clone()

    @staticmethod
    def _key(structure: tuple, inputs: list[Tensor], params: tuple[Tensor, ...] = ()) -> tuple:
        return (structure, *((t.shape, t.dtype, t.device, t.requires_grad) for t in inputs), tuple(map(id, params)))

    def _due(self, key: tuple, inputs: list[Tensor]) -> bool:
        """Whether a signature with no graph yet is to be captured now (else the call runs eagerly)."""
        if inputs and torch.is_autocast_enabled(inputs[0].device.type) and torch.is_autocast_cache_enabled():
            # an autocast entered around the call caches casts of trainable weights across calls: a capture would
            # record the warm-up's cast, not a cast, and replay stale weights after the optimiser steps
            if not self._warned:
                log.warning("%s: called inside an autocast with its weight cache on, running eagerly (enter "
                            "autocast inside the call, or with cache_enabled=False)", self.name)
                self._warned = True
            return False
        if self.ready is not None and (key not in self.seen or not self.ready()):
            self.seen.add(key)
            return False
        if len(self.graphs) >= self.max_graphs:
            if not self._warned:
                log.warning("%s: more than %d input shapes, running eagerly", self.name, self.max_graphs)
                self._warned = True
            return False
        return True

    def _warm_up(self, run: Callable[[], object]) -> None:
        """`run()` `warmup` times on a side stream, off any capture (lazy inits, compiled regions' first calls);
        `before_capture` after the first."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(self.warmup):
                run()
                if i == 0 and self.before_capture is not None:
                    self.before_capture()  # e.g. compile the region variants the first call met
        torch.cuda.current_stream().wait_stream(side)

    @torch.no_grad()
    def _capture(self, structure: tuple, inputs: list[Tensor]):
        static_in = [t.detach().clone().contiguous() for t in inputs]
        args = self._rebuild(structure, static_in)
        self._warm_up(lambda: self.fn(*args))
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread's CUDA calls (DALI) must not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.fn(*args)
        log.info("%s captured as a CUDA graph for input shapes %s", self.name, [tuple(t.shape) for t in static_in[:1]])
        return graph, static_in, static_out


class GraphedSolve(GraphedCall):
    """`GraphedCall` of a `TeacherSolve(x_start, path_bm, cond, guidance)`."""

    def __init__(self, solve: Solve, warmup: int = 2, before_capture: Callable[[], None] | None = None,
                 ready: Callable[[], bool] | None = None):
        super().__init__(solve, warmup, before_capture, ready, name="teacher solve")


@dataclass
class _TrainGraphs:
    """The two graphs of one capture of a `GraphedTrainCall` and the tensors they read and write."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    static_in: list[Tensor]
    """The call's tensors, in `_flatten` order; those that require grad are leaves the backward differentiates."""
    out: Tensor
    grad_out: Tensor
    grads: tuple[Tensor | None, ...]
    """The gradients the backward graph writes: of the inputs that require grad, then of `params` (None: unused)."""
    params: tuple[Tensor, ...]
    node: Callable[[], object] = lambda: None
    """A weak reference to the autograd node of this capture's last forward replay."""

    def busy(self) -> bool:
        """Whether the last replay's backward is still to run: another forward replay would overwrite the activations
        it reads (its node dead: the graph was dropped undifferentiated)."""
        node = self.node()
        return node is not None and not node.done


class _Replay(torch.autograd.Function):
    """The forward graph as an autograd node whose backward is the backward graph: the caller's inputs that require
    grad and the parameters are its inputs, so autograd passes the graph's gradients on and accumulates them into the
    parameters' `.grad` as for an eager call."""

    @staticmethod
    def forward(ctx, nodes: list, key: tuple, entry: _TrainGraphs, *differentiated: Tensor) -> Tensor:
        ctx.entry, ctx.done = entry, False
        entry.forward.replay()
        entry.node = weakref.ref(ctx)
        nodes.append((entry.node, key))
        return entry.out.clone()  # the static output is rewritten by the next replay; callers may keep theirs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        entry = ctx.entry
        entry.grad_out.copy_(grad)
        entry.backward.replay()
        ctx.done = True
        # autograd clones a returned gradient it cannot steal (these buffers are held here) or adds it in place
        return (None, None, None, *entry.grads)


class _Track(torch.autograd.Function):
    """The identity, whose node records that an eager call's autograd graph is alive and whether its backward ran."""

    @staticmethod
    def forward(ctx, nodes: list, key: tuple, out: Tensor) -> Tensor:
        ctx.done = False
        nodes.append((weakref.ref(ctx), key))
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.done = True
        return None, None, grad


class GraphedTrainCall(GraphedCall):
    """A drop-in for a differentiated call `fn(*args)` of the training step (the student's denoiser, the
    discriminator's logits) on CUDA: per input signature its forward and its backward — the gradients of the
    inputs that require grad and of `params()`, the parameters being trained — are captured as two CUDA graphs (as
    `torch.cuda.make_graphed_callables` does, here with dataclass arguments, thread-local capture and the background
    compiler's `ready`) and replayed through one autograd node, so `loss.backward()` replays the backward graph and
    the gradients flow on and fill `.grad` as in an eager step.

    A capture is taken only while no autograd graph of an earlier call of this wrapper is alive: a live graph holds
    the parameters' gradient-accumulator nodes, which belong to the stream they were made on, and a capture reaching
    them from its own stream is invalid (CUDA: "operation would make the legacy stream depend on a capturing
    blocking stream"). So calls run eagerly until such a moment, and any other autograd graph through `params()`
    must be freed before this wrapper's first call. A signature called again before its backward (a discriminator judging real and
    fake before one backward) gets as many captures as were seen in flight, up to `slots`; a further call in flight
    runs eagerly, as do calls without grad mode (previews, samplers). The parameters must keep their storage between
    steps (the optimiser and the EMA swap work in place), and the call must draw no random numbers."""

    def __init__(self, fn: Callable[..., Tensor], params: Callable[[], Iterable[Tensor]], warmup: int = 2,
                 before_capture: Callable[[], None] | None = None, ready: Callable[[], bool] | None = None,
                 name: str = "student forward", slots: int = 1):
        super().__init__(fn, warmup, before_capture, ready, name)
        self.params, self.slots = params, slots
        self.nodes: list[tuple[Callable[[], object], tuple]] = []  # (weak reference to a call's node, its key)
        self.depth: dict[tuple, int] = {}  # captures a signature needs: calls seen in flight at once

    def reset(self) -> None:
        super().reset()
        self.depth.clear()

    def __call__(self, *args) -> Tensor:
        if not torch.is_grad_enabled():
            return self.fn(*args)
        structure, inputs = self._flatten(args)
        params = tuple(p for p in self.params() if p.requires_grad)
        if not params and not any(t.requires_grad for t in inputs):
            return self.fn(*args)
        key = self._key(structure, inputs, params)
        self.nodes = [(ref, k) for ref, k in self.nodes if ref() is not None]
        captures = self.graphs.get(key)
        if not self.nodes and (captures is not None or self._due(key, inputs)):
            captures = self.graphs.setdefault(key, [])
            while len(captures) < self.depth.get(key, 1):
                captures.append(self._capture_one(structure, inputs, params))
        entry = next((e for e in captures or () if not e.busy()), None)
        if entry is not None:
            with torch.no_grad():
                for buf, t in zip(entry.static_in, inputs):
                    buf.copy_(t)
            return _Replay.apply(self.nodes, key, entry, *(t for t in inputs if t.requires_grad), *entry.params)
        in_flight = sum(1 for ref, k in self.nodes if k == key and (node := ref()) is not None and not node.done)
        self.depth[key] = min(self.slots, max(self.depth.get(key, 1), in_flight + 1))
        out = self.fn(*args)
        return _Track.apply(self.nodes, key, out) if out.requires_grad else out

    def _capture_one(self, structure: tuple, inputs: list[Tensor], params: tuple[Tensor, ...]) -> _TrainGraphs:
        static_in = [t.detach().clone().contiguous().requires_grad_(t.requires_grad) for t in inputs]
        args = self._rebuild(structure, static_in)
        wrt = (*(t for t in static_in if t.requires_grad), *params)

        def forward_backward():
            out = self.fn(*args)
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

        with torch.enable_grad():
            self._warm_up(forward_backward)
            pool = torch.cuda.graph_pool_handle()  # one per capture: its backward reads its forward's activations
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, pool=pool, capture_error_mode="thread_local"):
                out = self.fn(*args)
            grad_out = torch.empty_like(out)
            with torch.cuda.graph(backward, pool=pool, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
        log.info("%s and its backward captured as CUDA graphs for input shapes %s", self.name,
                 [tuple(t.shape) for t in static_in[:1]])
        return _TrainGraphs(forward, backward, static_in, out.detach(), grad_out, grads, params)
