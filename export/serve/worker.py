"""The one thread that owns the engines: it loads them, warms them up, and runs every generation, one at a
time, in the order they were admitted.

An engine set (ONNX Runtime sessions, or TensorRT execution contexts with their static buffers and CUDA graph)
is not safe to run concurrently, and a TensorRT context belongs to the thread and CUDA context that made it;
a single-thread executor gives both for free and keeps the event loop free for HTTP. Admission is bounded
(`max_queue` waiting behind the running one): past it, `submit` raises `QueueFull` at once, so a burst gets
503s instead of piling up memory and latency. A request that gives up (timeout, disconnect) cancels its work
if it is still waiting; a generation already running finishes and its result is dropped.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from export.runtime.image import to_uint8_frames
from export.runtime.pipeline import Noise, OneStepPipeline, write_mp4
from export.serve.metrics import ServeMetrics
from export.serve.request import GenerateRequest

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The engines are not loaded and warmed up (yet, or ever: the message says which)."""


class QueueFull(Exception):
    """`max_queue` requests are already waiting."""


class GenerationWorker:
    def __init__(self, engines: str | Path, backend: str, device: str, max_queue: int, metrics: ServeMetrics):
        self.engines, self.backend, self.device = Path(engines), backend, device
        self.max_queue, self.metrics = max_queue, metrics
        self.pipeline: OneStepPipeline | None = None
        self.state = "loading the engines"
        """Why the service is not ready, or 'ready'."""
        self.failed = False
        """The engines failed to load or to warm up: the service will never be ready (`state` says why)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prodistill-generate")
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> Future:
        """Load and warm up on the worker thread; the service answers /health meanwhile and /ready says why not."""
        return self._executor.submit(self._load)

    def _load(self) -> None:
        try:
            self.pipeline = OneStepPipeline(self.engines, self.backend, self.device)
            self.state = "warming up the engines"
            m = self.pipeline.manifest
            self.pipeline.generate_pixels(np.zeros((1, 3, m.height, m.width), np.float32), Noise.draw(m, 0))
            self.state = "ready"
            log.info("the engines in %s are loaded and warmed up (%s): ready", self.engines, self.backend)
        except Exception as e:  # reported in the log and by /ready, not by a dead worker thread
            self.state = f"the engines failed to load: {e}"
            self.failed = True
            log.error("%s; the service cannot serve until it is restarted with working engines", self.state)

    def submit(self, request: GenerateRequest, image_nchw: np.ndarray) -> Future:
        """Queue one generation; the future's result is the mp4's bytes, or the uint8 frames (F, H, W, 3) for
        `format="frames"`."""
        if not self.ready:
            raise NotReady(self.state)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        admitted = time.perf_counter()
        future = self._executor.submit(self._generate, request, image_nchw, admitted)
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future) -> None:
        """A request cancelled while waiting never reaches `_generate`, which is where the others leave the queue."""
        if future.cancelled():
            self._leave_queue()

    def _leave_queue(self) -> None:
        with self._lock:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    def _generate(self, request: GenerateRequest, image_nchw: np.ndarray, admitted: float) -> bytes | np.ndarray:
        self._leave_queue()
        start = time.perf_counter()
        self.metrics.queue_wait.observe(start - admitted)
        m = self.pipeline.manifest
        pixels = self.pipeline.generate_pixels(image_nchw, Noise.draw(m, request.seed), request.tts, request.fps,
                                               request.motion_bucket_id)
        frames = to_uint8_frames(pixels[0])
        used = self.pipeline.backend.gpu_memory_used()
        if used is not None:
            self.metrics.set_gpu_memory(used)
        if request.format == "frames":
            self.metrics.generation.observe(time.perf_counter() - start)
            return frames
        with tempfile.TemporaryDirectory(prefix="prodistill-serve-") as tmp:
            data = write_mp4(Path(tmp) / "out.mp4", frames, request.fps or m.fps).read_bytes()
        self.metrics.generation.observe(time.perf_counter() - start)
        return data

    def close(self) -> None:
        """Finish what was admitted, then stop the thread (uvicorn has drained the HTTP requests by then)."""
        self._executor.shutdown(wait=True)
