"""`prodistill serve` (also `prodistill-serve` and `python -m export.serve`): the HTTP service on uvicorn.

Dispatched by `prodistill.entry` without importing the torch-based CLI, like `generate`. SIGTERM (and Ctrl-C)
start uvicorn's graceful shutdown: the socket stops accepting, requests in flight — those waiting in the
queue included — finish, the worker thread stops, and the process exits 0.
"""

from __future__ import annotations

import signal
import sys

import click


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
              help="Seconds a request may take (queue and generation) before it is answered 504.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Largest request body in MiB, checked before the image is read or decoded.")
@click.option("--max-pixels", type=click.IntRange(1), default=4096 * 4096, show_default=True,
              help="Largest image (width × height), checked from its header before decoding.")
@click.option("--token", envvar="PRODISTILL_SERVE_TOKEN", default=None,
              help="Bearer token required on every route but /health and /ready (env PRODISTILL_SERVE_TOKEN).")
def serve(engines, host, port, backend, device, max_queue, timeout_s, max_body_mb, max_pixels, token) -> None:
    """Serve the exported 1-step student over HTTP: POST /v1/generate, GET /health, /ready, /metrics."""
    try:
        import uvicorn

        from export.serve.app import ServeSettings, build_app
    except ImportError as e:
        raise click.ClickException(f'prodistill serve needs the serving stack ({e.name} is missing): '
                                   'pip install ".[serve]"') from None
    from export.serve.metrics import ServeMetrics
    from export.serve.worker import GenerationWorker

    metrics = ServeMetrics()
    worker = GenerationWorker(engines, backend, device, max_queue, metrics)
    settings = ServeSettings(timeout_s=timeout_s, max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels,
                             token=token)
    # uvicorn re-raises the signal that stopped it once it has drained; with this handler that ends in exit 0
    # instead of death by SIGTERM, which orchestrators would report as a crash.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(build_app(worker, settings, metrics), host=host, port=port, log_level="info")
