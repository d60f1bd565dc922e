"""`prodistill serve` (also `prodistill-serve` and `python -m export.serve`): the HTTP service on uvicorn.

Dispatched by `prodistill.entry` without importing the torch-based CLI, like `generate`. SIGTERM (and Ctrl-C)
start uvicorn's graceful shutdown: the socket stops accepting, requests in flight — those waiting in the
queue included — finish, the worker thread stops, and the process exits 0. No request takes longer than
`--timeout` (its body, queue and generation), so connections still open `SHUTDOWN_GRACE_S` after that are
stuck (a client that stopped reading) and are cut: the shutdown is bounded.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys

import click

TOKEN_ENV = "PRODISTILL_SERVE_TOKEN"
SHUTDOWN_GRACE_S = 5
"""Seconds past `--timeout` that the graceful shutdown waits for open connections before cutting them."""


@click.command()
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `prodistill export` (manifest.json, ONNX graphs, TensorRT engines).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 in a container).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu); trt: the TensorRT engines.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime's device (auto: CUDA when onnxruntime-gpu provides it).")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests that may wait behind the running generation; more get 503 with Retry-After.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request may take (its body, queue and generation) before it is answered 408 (body "
                   f"not received) or 504; a shutdown waits at most this long plus {SHUTDOWN_GRACE_S} s for them.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Largest request body in MiB, checked before the image is read or decoded.")
@click.option("--max-pixels", type=click.IntRange(1), default=4096 * 4096, show_default=True,
              help="Largest image (width × height), checked from its header before decoding.")
@click.option("--token", envvar=TOKEN_ENV, default=None,
              help="Bearer token required on every route but /health and /ready (env PRODISTILL_SERVE_TOKEN).")
def serve(engines, host, port, backend, device, max_queue, timeout_s, max_body_mb, max_pixels, token) -> None:
    """Serve the exported 1-step student over HTTP: POST /v1/generate, GET /health, /ready, /metrics."""
    try:
        import uvicorn
        from uvicorn.config import LOGGING_CONFIG

        from export.serve.app import ServeSettings, build_app
    except ImportError as e:
        raise click.ClickException(f'prodistill serve needs the serving stack ({e.name} is missing): '
                                   'pip install ".[serve]"') from None
    from export.runtime.manifest import Manifest
    from export.serve.metrics import ServeMetrics
    from export.serve.worker import GenerationWorker

    if token is None:
        token = os.environ.get(TOKEN_ENV)  # click reads an empty variable as unset; ServeSettings refuses it
    try:
        Manifest.load(engines)  # refused at start-up, as `generate` refuses it; the graphs load on the worker
        settings = ServeSettings(timeout_s=timeout_s, max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels,
                                 token=token)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    metrics = ServeMetrics()
    worker = GenerationWorker(engines, backend, device, max_queue, metrics)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # the worker's log (engines loaded, or why not) as uvicorn's
    log_config["loggers"]["export.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # uvicorn re-raises the signal that stopped it once it has drained; with this handler that ends in exit 0
    # instead of death by SIGTERM, which orchestrators would report as a crash.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(build_app(worker, settings, metrics), host=host, port=port, log_level="info", log_config=log_config,
                timeout_graceful_shutdown=math.ceil(timeout_s) + SHUTDOWN_GRACE_S)
