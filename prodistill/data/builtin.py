"""The built-in default dataset: eight short clips rendered from real photographs.

`prodistill train` with no `--data` has to run anywhere, offline, in seconds, and the videos it trains on
should still look like video: natural-image statistics and coherent motion, so that a temporal head or a
motion loss has something to learn. Noise or synthetic shapes would not give that, and no video can be
downloaded on our machines, so we animate the photographs that scikit-image ships: a virtual camera pans,
tilts and zooms over a photograph (a moving crop window resized back with an anti-aliased filter), and
discs cut from other photographs move across the frame along lines and arcs. Everything is a fixed
function of the clip table below, so every machine builds byte-for-byte the same inputs to the encoder.

The clips are built once into `$PRODISTILL_CACHE/builtin-clips-v3` (PRODISTILL_CACHE defaults to
`~/.cache/prodistill`) and reused. A build happens in a temporary sibling folder that is renamed into place
only when complete, so an interrupted build is never mistaken for a finished one, and when several ranks
build at once the first rename wins and the others discard their copy. Bump the folder's version when the
clip table changes.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

from prodistill.data.video import write_mp4

CLIP_WIDTH = 160
CLIP_HEIGHT = 128
CLIP_FPS = 14.0
CLIP_FRAMES = 32
_FOLDER = "builtin-clips-v3"
_DONE = "DONE"
# Photographs are first resized so the shorter side is twice the clip height: the camera then zooms
# between 1x and ~2x without ever upsampling, and every frame is a mild anti-aliased downscale.
_WORKING_SHORT_SIDE = 2 * CLIP_HEIGHT

Trajectory = Callable[[float], tuple[float, float]]
"""Maps clip time t in [0, 1] to a sprite centre (x, y) in output pixels."""


def _line(x0: float, y0: float, x1: float, y1: float) -> Trajectory:
    return lambda t: (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)


def _arc(cx: float, cy: float, radius: float, deg0: float, deg1: float) -> Trajectory:
    def at(t: float) -> tuple[float, float]:
        angle = math.radians(deg0 + (deg1 - deg0) * t)
        return cx + radius * math.cos(angle), cy - radius * math.sin(angle)

    return at


@dataclass(frozen=True)
class _Camera:
    """A crop window eased from `start` to `end`, each (cx, cy, zoom).

    (cx, cy) is the window centre as a fraction of the photograph's width and height (clamped so the
    window stays inside); zoom 1 is the largest window of the clip's aspect that fits, zoom 2 half its size.
    """

    start: tuple[float, float, float]
    end: tuple[float, float, float]


@dataclass(frozen=True)
class _Sprite:
    """A disc of `radius` output pixels cut around `center` (fractions) of `photo`, moving along `path`."""

    photo: str
    center: tuple[float, float]
    radius: int
    path: Trajectory


@dataclass(frozen=True)
class _Clip:
    name: str
    photo: str
    camera: _Camera
    sprites: tuple[_Sprite, ...] = ()


_CLIPS: tuple[_Clip, ...] = (
    _Clip("00_pan_astronaut", "astronaut", _Camera((0.33, 0.45, 1.6), (0.67, 0.45, 1.6))),
    _Clip("01_zoom_in_coffee", "coffee", _Camera((0.50, 0.50, 1.0), (0.45, 0.55, 2.0))),
    _Clip("02_zoom_out_chelsea", "chelsea", _Camera((0.60, 0.40, 2.0), (0.50, 0.50, 1.0))),
    _Clip("03_tilt_rocket", "rocket", _Camera((0.50, 0.71, 1.8), (0.50, 0.29, 1.8))),
    _Clip("04_pan_zoom_hubble", "hubble_deep_field", _Camera((0.25, 0.30, 1.2), (0.70, 0.65, 2.0))),
    _Clip(
        "05_disc_line_immunohistochemistry",
        "immunohistochemistry",
        _Camera((0.50, 0.50, 1.3), (0.50, 0.50, 1.3)),
        (_Sprite("chelsea", (0.40, 0.35), 22, _line(-10, 40, 170, 92)),),
    ),
    _Clip(
        "06_disc_arc_retina",
        "retina",
        _Camera((0.45, 0.50, 1.4), (0.55, 0.50, 1.4)),
        (_Sprite("astronaut", (0.45, 0.25), 20, _arc(80, 70, 45, 200, -20)),),
    ),
    _Clip(
        "07_two_discs_camera",
        "camera",
        _Camera((0.50, 0.45, 1.0), (0.48, 0.40, 1.5)),
        (
            _Sprite("colorwheel", (0.50, 0.50), 16, _line(150, 10, 20, 118)),
            _Sprite("coffee", (0.50, 0.45), 18, _arc(80, 64, 38, 90, 360)),
        ),
    ),
)


def _default_root() -> Path:
    cache = os.environ.get("PRODISTILL_CACHE") or "~/.cache/prodistill"
    return Path(cache).expanduser() / _FOLDER


def _load_photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as float32 (3, H, W) in [0, 255]; grayscale ones are stacked to RGB."""
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return torch.from_numpy(image[..., :3].astype(np.float32)).permute(2, 0, 1)


def _resize(image_chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(
        image_chw[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )[0]


def _working_photo(name: str) -> torch.Tensor:
    photo = _load_photo(name)
    h, w = photo.shape[1:]
    scale = _WORKING_SHORT_SIDE / min(h, w)
    return _resize(photo, round(h * scale), round(w * scale))


def _ease(t: float) -> float:
    """Half linear, half smoothstep: the camera speeds up and slows down like a real move, but never
    stands still, so every pair of consecutive frames differs."""
    return 0.5 * t + 0.5 * t * t * (3.0 - 2.0 * t)


def _camera_frames(photo_chw: torch.Tensor, camera: _Camera) -> torch.Tensor:
    """Render the camera move over `photo_chw` to (CLIP_FRAMES, 3, CLIP_HEIGHT, CLIP_WIDTH) floats."""
    h, w = photo_chw.shape[1:]
    aspect = CLIP_WIDTH / CLIP_HEIGHT
    widest_h = min(h, w / aspect)
    frames = []
    for k in range(CLIP_FRAMES):
        s = _ease(k / (CLIP_FRAMES - 1))
        cx, cy, zoom = (a + (b - a) * s for a, b in zip(camera.start, camera.end))
        crop_h = min(h, round(widest_h / zoom))
        crop_w = min(w, round(crop_h * aspect))
        top = min(max(round(cy * h - crop_h / 2), 0), h - crop_h)
        left = min(max(round(cx * w - crop_w / 2), 0), w - crop_w)
        window = photo_chw[:, top : top + crop_h, left : left + crop_w]
        frames.append(_resize(window, CLIP_HEIGHT, CLIP_WIDTH))
    return torch.stack(frames)


def _disc(sprite: _Sprite) -> tuple[torch.Tensor, torch.Tensor]:
    """The sprite's texture (3, 2r, 2r) and its anti-aliased disc alpha (1, 2r, 2r)."""
    photo = _working_photo(sprite.photo)
    h, w = photo.shape[1:]
    side = round(0.35 * min(h, w))  # cut a generous patch, then shrink it: the disc shows a recognisable part
    top = min(max(round(sprite.center[1] * h - side / 2), 0), h - side)
    left = min(max(round(sprite.center[0] * w - side / 2), 0), w - side)
    size = 2 * sprite.radius
    texture = _resize(photo[:, top : top + side, left : left + side], size, size)
    coords = torch.arange(size, dtype=torch.float32) + 0.5 - sprite.radius
    distance = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    alpha = (sprite.radius - distance).clamp(0.0, 1.0)[None]
    return texture, alpha


def _composite(frames_fchw: torch.Tensor, sprite: _Sprite) -> None:
    """Paste the sprite disc into every frame in place, at its trajectory position, clipped to the frame."""
    texture, alpha = _disc(sprite)
    size = texture.shape[-1]
    for k, frame in enumerate(frames_fchw):
        x, y = sprite.path(k / (CLIP_FRAMES - 1))
        top, left = round(y) - sprite.radius, round(x) - sprite.radius
        y0, y1 = max(top, 0), min(top + size, CLIP_HEIGHT)
        x0, x1 = max(left, 0), min(left + size, CLIP_WIDTH)
        if y0 >= y1 or x0 >= x1:
            continue
        a = alpha[:, y0 - top : y1 - top, x0 - left : x1 - left]
        t = texture[:, y0 - top : y1 - top, x0 - left : x1 - left]
        frame[:, y0:y1, x0:x1] = a * t + (1 - a) * frame[:, y0:y1, x0:x1]


def _render(clip: _Clip) -> np.ndarray:
    """The clip's frames as uint8 (CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, 3)."""
    frames = _camera_frames(_working_photo(clip.photo), clip.camera)
    for sprite in clip.sprites:
        _composite(frames, sprite)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ensure_builtin_clips(root: str | Path | None = None) -> Path:
    """Return the folder of built-in clips, building it first if it is not there yet.

    `root` defaults to `$PRODISTILL_CACHE/builtin-clips-v3`. The folder holds eight H.264 mp4 clips of
    CLIP_FRAMES frames at CLIP_FPS, CLIP_WIDTH x CLIP_HEIGHT pixels, and a DONE marker.
    """
    root = Path(root).expanduser() if root is not None else _default_root()
    if (root / _DONE).is_file():
        return root
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists but is not a finished built-in clip folder (no {_DONE} marker); "
                "delete it or pass another root."
            )
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)
    build = root.parent / f".{root.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    threads = torch.get_num_threads()
    try:
        build.mkdir()
        # Hundreds of tiny resizes: intra-op threads only add overhead, and OpenMP threads that spin-wait
        # on a busy core made the build 3x slower on a shared 2-core machine.
        torch.set_num_threads(1)
        for clip in _CLIPS:
            write_mp4(build / f"{clip.name}.mp4", _render(clip), CLIP_FPS, codec="h264")
        (build / _DONE).write_text(f"{len(_CLIPS)} clips\n")
        try:
            os.rename(build, root)
        except OSError:
            if not (root / _DONE).is_file():  # not a concurrent build that finished first
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(build, ignore_errors=True)
    return root
