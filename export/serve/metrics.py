"""The service's Prometheus metrics, in a registry of their own (not the process-global one), so that two apps
in one process — the tests start several — never share or collide on counters."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""From a tiny CPU export (~0.1 s) to a full-size 14×576×1024 generation with a queue in front of it."""

ROUTES = ("/v1/generate", "/health", "/ready", "/metrics")


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("prodistill_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=self.registry)
        self.queue_depth = Gauge("prodistill_queue_depth", "Generation requests waiting for the engines "
                                 "(not counting the one running).", registry=self.registry)
        self.queue_wait = Histogram("prodistill_queue_wait_seconds", "Time from admission to the start of the "
                                    "generation.", buckets=SECONDS_BUCKETS, registry=self.registry)
        self.gpu_memory: Gauge | None = None
        """Created on the first reading, so a backend that cannot tell (ort) exports no made-up zero."""
        self.generation = Histogram("prodistill_generation_seconds", "Time of one generation, mp4 encoding "
                                    "included.", buckets=SECONDS_BUCKETS, registry=self.registry)

    def set_gpu_memory(self, used_bytes: int) -> None:
        if self.gpu_memory is None:
            self.gpu_memory = Gauge("prodistill_gpu_memory_used_bytes", "GPU memory in use after the last "
                                    "generation (whole device), where the backend can tell (trt).",
                                    registry=self.registry)
        self.gpu_memory.set(used_bytes)

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
