"""`prodistill bench serve`: requests/s and p50/p95/p99 latency of `prodistill serve` at several client
concurrencies, in one run against one local server process.

The server is started as users start it (`python -m export.serve`, loopback, a free port) and driven over HTTP
by client threads, so the figures include everything a client waits for: HTTP, image decoding, the queue, the
generation and the mp4 encoding. Generations run one at a time, so past concurrency 1 the requests/s stays at
the single-stream rate and latency grows with the queue; the table shows how much the overlap of request
handling with generation buys, and what a client waits at each load. Torch-free like the server itself.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from prodistill.atomic import atomic_write_text


def run_serve_bench(engines: str | Path, backend: str = "ort", device: str = "auto",
                    concurrency: tuple[int, ...] = (1, 4, 16), requests: int = 32, tts: bool = False,
                    echo=print) -> dict:
    """One server, one warm-up request, then `requests` requests at each concurrency in turn."""
    from export.runtime.manifest import Manifest

    manifest = Manifest.load(engines)
    body = json.dumps({"image": _random_png(manifest.width, manifest.height), "tts": tts}).encode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="prodistill-bench-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "export.serve", "--engines", str(engines), "--port", str(port), "--backend",
               backend, "--device", device, "--max-queue", str(max(concurrency)), "--timeout", "600"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_ready(port, server, Path(log.name))
        echo(f"server ready on 127.0.0.1:{port} ({backend}); warm-up request")
        _post(port, body)
        rows = []
        for level in concurrency:
            rows.append(_measure(port, body, level, requests))
            echo(f"concurrency {level}: {rows[-1]['requests_per_s']:.2f} requests/s")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return {"engines": str(engines), "backend": backend, "tts": tts, "frames": manifest.frames,
            "resolution": f"{manifest.width}x{manifest.height}", "requests_per_level": requests, "rows": rows}


def _measure(port: int, body: bytes, concurrency: int, requests: int) -> dict:
    tickets = itertools.count()  # next() on it is atomic under the GIL: each request is taken exactly once
    latencies: list[float] = []
    statuses: Counter = Counter()

    def client() -> None:
        while next(tickets) < requests:
            start = time.perf_counter()
            status = _post(port, body)
            elapsed = time.perf_counter() - start
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (float("nan"),) * 3
    return {"concurrency": concurrency, "requests": requests, "ok": statuses[200],
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": wall,
            "requests_per_s": statuses[200] / wall, "p50_s": float(p50), "p95_s": float(p95), "p99_s": float(p99)}


def _post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_ready(port: int, server: subprocess.Popen, log: Path, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ValueError(f"the server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                return
        except urllib.error.HTTPError as e:
            if e.code >= 500 and e.code != 503:  # the engines failed to load: no use waiting (503: still loading)
                raise ValueError(f"the server cannot serve: {e.read().decode(errors='replace')[:500]}") from None
            time.sleep(0.2)
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise ValueError(f"the server was not ready within {limit_s:g} s (log: {log})")


def _random_png(width: int, height: int) -> str:
    """Base64 PNG at the export's resolution, so the timing holds no resize work a real client would avoid."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def format_serve_table(result: dict) -> str:
    lines = [f"{'concurrency':>11} {'ok':>5} {'requests/s':>11} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8}  statuses"]
    for r in result["rows"]:
        lines.append(f"{r['concurrency']:>11} {r['ok']:>5} {r['requests_per_s']:>11.2f} {r['p50_s']:>8.3f} "
                     f"{r['p95_s']:>8.3f} {r['p99_s']:>8.3f}  {r['statuses']}")
    return "\n".join(lines)


def write_serve_json(result: dict, path: Path) -> Path:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path
