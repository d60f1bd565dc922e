"""The body of `POST /v1/generate` → a validated `GenerateRequest`, or a `RequestError` that the app answers
with its status and one sentence.

Two encodings carry the same fields: `multipart/form-data` (the image as a file part, the others as text
fields) and `application/json` (the image base64-encoded). The body's size is checked against the limit while
it is read — from `Content-Length` before reading when the client sends one — so an oversized upload is
refused before any of it is buffered past the limit or decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

SEED_MAX = 2**32 - 1
FPS_RANGE = (1.0, 60.0)
MOTION_RANGE = (0, 255)
FIELDS = ("image", "seed", "tts", "fps", "motion_bucket_id", "format")
FORMATS = ("mp4", "frames")
"""What /v1/generate answers: the H.264 video, or JSON with the raw uint8 frames (lossless, for clients that
re-encode or post-process)."""


class RequestError(Exception):
    """A client error: `status` (4xx) and a one-sentence `message` that says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class GenerateRequest:
    image: bytes
    """The encoded image (PNG, JPEG, ...), not yet decoded."""
    seed: int = 0
    """Seed of numpy's generator for all noise, as `prodistill generate --seed`."""
    tts: bool = False
    """Time Travel Sampler (two student calls) instead of one step."""
    fps: float | None = None
    """SVD's fps conditioning and the mp4's frame rate; None: the manifest's."""
    motion_bucket_id: int | None = None
    """SVD's motion conditioning; None: the manifest's."""
    format: str = "mp4"
    """One of FORMATS."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    too_large = RequestError(413, f"the request body is larger than {max_bytes} bytes: send a smaller image")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer: it only keeps a traceback out of the log
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def parse_generate(request: Request, max_bytes: int) -> GenerateRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        fields = _json_fields(await read_body(request, max_bytes))
    elif content_type == "multipart/form-data":
        fields = await _multipart_fields(request, await read_body(request, max_bytes), max_bytes)
    else:
        raise RequestError(415, f"content type {content_type or 'none'} is not accepted: send multipart/form-data "
                                "with an image file or application/json with a base64 image")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}: the fields are {', '.join(FIELDS)}")
    if "image" not in fields:
        raise RequestError(422, "the request has no image field: send the conditioning image as 'image'")
    return GenerateRequest(
        image=fields["image"],
        seed=_integer(fields, "seed", 0, SEED_MAX, 0),
        tts=_boolean(fields, "tts"),
        fps=_number(fields, "fps", *FPS_RANGE),
        motion_bucket_id=_integer(fields, "motion_bucket_id", *MOTION_RANGE, None),
        format=_choice(fields, "format", FORMATS),
    )


def _json_fields(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(400, 'the body is not valid JSON: send an object such as {"image": "<base64>"}') from None
    if not isinstance(fields, dict):
        raise RequestError(400, 'the JSON body must be an object such as {"image": "<base64>"}')
    if "image" in fields:
        if not isinstance(fields["image"], str):
            raise RequestError(422, "'image' must be a base64 string of the image file")
        try:
            fields["image"] = base64.b64decode(fields["image"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "'image' is not valid base64: encode the image file's bytes") from None
    return fields


async def _multipart_fields(request: Request, body: bytes, max_bytes: int) -> dict:
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=max_bytes)
    except Exception as e:  # starlette wraps python-multipart's parse errors in its own HTTPException
        raise RequestError(400, f"the multipart body could not be parsed ({getattr(e, 'detail', e)})") from None
    fields = {}
    for key, value in form.multi_items():
        if key in fields:
            raise RequestError(422, f"the field {key} is given twice: send it once")
        if isinstance(value, UploadFile):
            if key != "image":
                raise RequestError(422, f"only 'image' may be a file, {key} is one: send it as a text field")
            value = await value.read()
        elif key == "image":
            raise RequestError(422, "'image' must be a file part of the multipart body")
        fields[key] = value
    await form.close()
    return fields


def _integer(fields: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    raw = fields.get(name)
    if raw is None:
        return default
    value = int(raw) if isinstance(raw, str) and raw.strip().lstrip("-").isdigit() else raw
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {raw!r}")
    return value


def _number(fields: dict, name: str, lo: float, hi: float) -> float | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        value = float(raw) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise RequestError(422, f"{name} must be a number in [{lo:g}, {hi:g}], got {raw!r}")
    return value


def _choice(fields: dict, name: str, choices: tuple[str, ...]) -> str:
    raw = fields.get(name, choices[0])
    if raw not in choices:
        raise RequestError(422, f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _boolean(fields: dict, name: str) -> bool:
    raw = fields.get(name, False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
        return raw.lower() in ("true", "1")
    raise RequestError(422, f"{name} must be true or false, got {raw!r}")
