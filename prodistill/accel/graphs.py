"""The frozen teacher's m-step guided solve (OSV eq. 8) replayed as one CUDA graph.

The solve is the step's largest block of work (m = 5 guided UNet calls at batch 2B: about 60 % of an eager
stage-2 step) and the best candidate for graph capture: the teacher is frozen (no autograd state), the loop
length m is static, σ values are tensors, and nothing in it draws random numbers (the noise ε is drawn by the
method before the call). One capture records every kernel of the m steps; a replay launches them all with no
Python, no dynamo guard checks and no per-kernel launch overhead.

Static buffers: the call's inputs (x_{t_{n+m}}, the σ path, the condition's tensors, the per-frame guidance)
are copied into tensors owned by the graph before each replay, and the result is copied out, so callers see
an ordinary function. One graph is kept per input signature (shapes and dtypes); all share one memory pool.
"""

from __future__ import annotations

import logging
from dataclasses import astuple
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger("prodistill")

Solve = Callable[[Tensor, Tensor, object, Tensor], Tensor]


class GraphedSolve:
    """A drop-in for a `TeacherSolve(x_start, path_bm, cond, guidance)` on CUDA that captures it once per
    input signature and replays it. `cond` is a dataclass of tensors (e.g. `SVDCondition`). `before_capture`
    runs after the first warm-up call, so that what that call prepared (ahead-of-time compiled regions) is what
    the graph records. With `ready` (regions compiled in the background), the first call of a signature runs
    eagerly, and so does every later one until `ready()` says nothing is left to compile: the steps go on while
    the compiler works, and the graph is captured once, from compiled regions."""

    max_graphs = 4
    """Signatures kept; past that (a training run has one or two) calls run eagerly, with one warning."""

    def __init__(self, solve: Solve, warmup: int = 2, before_capture: Callable[[], None] | None = None,
                 ready: Callable[[], bool] | None = None):
        self.solve, self.warmup, self.before_capture, self.ready = solve, warmup, before_capture, ready
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        self.pool = None
        self._warned = False

    @staticmethod
    def _inputs(x_start: Tensor, path_bm: Tensor, cond, guidance: Tensor) -> list[Tensor]:
        return [x_start, path_bm, guidance, *astuple(cond)]

    def _rebuild(self, cond_type, tensors: list[Tensor]):
        x_start, path_bm, guidance, *cond = tensors
        return x_start, path_bm, cond_type(*cond), guidance

    def __call__(self, x_start: Tensor, path_bm: Tensor, cond, guidance: Tensor) -> Tensor:
        inputs = self._inputs(x_start, path_bm, cond, guidance)
        key = (type(cond), *((t.shape, t.dtype, t.device) for t in inputs))
        entry = self.graphs.get(key)
        if entry is None:
            if self.ready is not None and (key not in self.seen or not self.ready()):
                self.seen.add(key)
                return self.solve(x_start, path_bm, cond, guidance)
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    log.warning("teacher solve: more than %d input shapes, running eagerly", self.max_graphs)
                    self._warned = True
                return self.solve(x_start, path_bm, cond, guidance)
            entry = self.graphs[key] = self._capture(type(cond), inputs)
        graph, static_in, static_out = entry
        for buf, t in zip(static_in, inputs):
            buf.copy_(t)
        graph.replay()
        return static_out.clone()

    @torch.no_grad()
    def _capture(self, cond_type, inputs: list[Tensor]):
        static_in = [t.detach().clone().contiguous() for t in inputs]
        args = self._rebuild(cond_type, static_in)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, compiled-region first calls
            for i in range(self.warmup):
                self.solve(*args)
                if i == 0 and self.before_capture is not None:
                    self.before_capture()  # e.g. compile the region variants the first call met
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread's CUDA calls (DALI) must not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.solve(*args)
        log.info("teacher solve captured as a CUDA graph for input shapes %s",
                 [tuple(t.shape) for t in static_in[:1]])
        return graph, static_in, static_out

