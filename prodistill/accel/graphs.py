"""Forward-only calls of the training step replayed as CUDA graphs: the frozen teacher's m-step guided solve
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
"""

from __future__ import annotations

import logging
from dataclasses import fields, is_dataclass
from typing import Callable

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
        key = (structure, *((t.shape, t.dtype, t.device) for t in inputs))
        entry = self.graphs.get(key)
        if entry is None:
            if self.ready is not None and (key not in self.seen or not self.ready()):
                self.seen.add(key)
                return self.fn(*args)
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    log.warning("%s: more than %d input shapes, running eagerly", self.name, self.max_graphs)
                    self._warned = True
                return self.fn(*args)
            entry = self.graphs[key] = self._capture(structure, inputs)
        graph, static_in, static_out = entry
        for buf, t in zip(static_in, inputs):
            buf.copy_(t)
        graph.replay()
        return static_out.clone()

    @torch.no_grad()
    def _capture(self, structure: tuple, inputs: list[Tensor]):
        static_in = [t.detach().clone().contiguous() for t in inputs]
        args = self._rebuild(structure, static_in)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, compiled-region first calls
            for i in range(self.warmup):
                self.fn(*args)
                if i == 0 and self.before_capture is not None:
                    self.before_capture()  # e.g. compile the region variants the first call met
        torch.cuda.current_stream().wait_stream(side)
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
