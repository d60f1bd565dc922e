"""The Starlette application: routes, the bearer token, status counting, and the mapping from failures to
HTTP answers. Every error is JSON `{"error": "<one sentence>"}` with the status that tells the client what to
do: 4xx fix the request, 401 send the token, 408 send the body without stalling, 503 come back later
(`Retry-After`), 504 the generation took longer than `timeout`, 500 the engines failed to load (no retry helps).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from export.runtime.image import ImageTooLarge, load_image
from export.serve.metrics import ServeMetrics
from export.serve.request import RequestError, parse_generate
from export.serve.worker import GenerationWorker, NotReady, QueueFull

OPEN_ROUTES = ("/health", "/ready")
"""Probes stay open with a token set: Docker's HEALTHCHECK and orchestrators do not send one."""


@dataclass(kw_only=True)
class ServeSettings:
    timeout_s: float = 60.0
    """Time a request may take in all: one whose body has not arrived by then is answered 408, one whose
    generation has not finished (queue included) 504. Also bounds the graceful shutdown (`export.serve.cli`)."""
    max_body_bytes: int = 10 * 2**20
    """Largest request body; checked before it is read in full."""
    max_pixels: int = 4096 * 4096
    """Largest image (width × height), checked from the image header before decoding."""
    retry_after_s: int = 1
    """`Retry-After` of a 503 (queue full, not ready)."""
    token: str | None = None
    """Bearer token that every route except the probes requires; None: no authentication."""

    def __post_init__(self):
        if self.token is not None and not self.token.strip():  # e.g. a Docker secret that was not mounted
            raise ValueError("the bearer token (--token or PRODISTILL_SERVE_TOKEN) is empty: set it to the token "
                             "clients must send, or unset it to serve without authentication")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(worker: GenerationWorker, settings: ServeSettings, metrics: ServeMetrics) -> Starlette:
    retry = {"Retry-After": str(settings.retry_after_s)}

    def not_ready() -> JSONResponse:
        """503 with Retry-After while the engines load; 500 without it once they failed, which no retry mends."""
        if worker.failed:
            return error(500, f"the service cannot serve: {worker.state}")
        return error(503, f"the service is not ready: {worker.state}", retry)

    async def generate(request: Request) -> Response:
        deadline = time.monotonic() + settings.timeout_s
        try:
            body = await asyncio.wait_for(parse_generate(request, settings.max_body_bytes), settings.timeout_s)
            if not worker.ready:
                raise NotReady(worker.state)
            m = worker.pipeline.manifest
            image = await asyncio.to_thread(load_image, BytesIO(body.image), m.width, m.height, settings.max_pixels)
        except asyncio.TimeoutError:  # a client stalled mid-upload would otherwise hold the connection for ever
            return error(408, f"the request body did not arrive within {settings.timeout_s:g} s: send it whole, "
                              "without pausing")
        except RequestError as e:
            return error(e.status, e.message)
        except ImageTooLarge as e:
            return error(413, str(e))
        except ValueError:
            return error(400, "the image could not be decoded: send a PNG or JPEG file")
        except NotReady:
            return not_ready()
        try:
            future = worker.submit(body, image)
        except QueueFull as e:
            return error(503, f"the generation queue is full ({e}): retry later", retry)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            future.cancel()  # dropped if still waiting; a running generation finishes and its video is discarded
            return error(504, f"the generation did not finish within {settings.timeout_s:g} s: retry later")
        except Exception as e:  # a backend failure fails this request, not the service
            return error(500, f"the generation failed: {e}")
        if body.format == "frames":  # (F, H, W, 3) uint8, row-major, base64
            return JSONResponse({"frames": base64.b64encode(result.tobytes()).decode(), "shape": list(result.shape),
                                 "dtype": "uint8", "fps": body.fps or worker.pipeline.manifest.fps})
        return Response(result, media_type="video/mp4")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(request: Request) -> Response:
        if worker.ready:
            return JSONResponse({"status": "ready", "backend": worker.backend})
        return not_ready()

    async def metrics_route(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        worker.start()  # not awaited: uvicorn accepts connections once the lifespan has started
        yield
        await asyncio.to_thread(worker.close)

    routes = [Route("/v1/generate", generate, methods=["POST"]), Route("/health", health),
              Route("/ready", ready), Route("/metrics", metrics_route)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(Guard, metrics=metrics, token=settings.token)
    return app


class Guard:
    """ASGI middleware: checks the bearer token and counts every answer by route and status (401s included)."""

    def __init__(self, app, metrics: ServeMetrics, token: str | None):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected and scope["path"] not in OPEN_ROUTES and not self._authorized(scope):
                await error(401, "a bearer token is required: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count(scope["path"], status)

    def _authorized(self, scope) -> bool:
        sent = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(sent, self.expected)
