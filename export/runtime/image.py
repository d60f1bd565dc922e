"""Image preprocessing in numpy, equal to the torch code it replaces (within float rounding):

- `load_image`: `prodistill.sampling.load_image` — cover-resize (bilinear, antialiased) and centre-crop;
- `clip_pixels`: `SVDModels.encode_image_embeds`' input — bicubic antialiased resize to the CLIP size, then
  CLIP's mean/std normalisation;
- `to_uint8_frames`: `prodistill.sampling.to_uint8_frames`.

`resize_antialiased` reproduces `torch.nn.functional.interpolate(..., antialias=True, align_corners=False)`:
a separable filter whose support widens with the downscale factor (PIL's scheme, which torch follows), with
the same window bounds and normalised weights, so the runtime conditions the student on the same pixels as
`prodistill sample` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 1 - x, 0.0)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic with a = −0.5, the coefficient torch's (and PIL's) antialiased bicubic uses."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


_FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0)}
"""mode → (filter, half-width of its support at scale 1)."""


def _weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """(out_size, in_size) matrix of one axis' resampling weights."""
    kernel, half = _FILTERS[mode]
    scale = in_size / out_size
    support = half * scale if scale >= 1 else half
    inv = 1 / scale if scale >= 1 else 1.0
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = kernel((np.arange(lo, hi) - center + 0.5) * inv)
        matrix[i, lo:hi] = w / w.sum()
    return matrix


def resize_antialiased(x_nchw: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize (N, C, H, W) to (N, C, height, width) as torch's antialiased `interpolate` (float32 out)."""
    rows = _weights(x_nchw.shape[-2], height, mode)
    cols = _weights(x_nchw.shape[-1], width, mode)
    out = np.einsum("oh,nchw,pw->ncop", rows, x_nchw.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def cover_crop(x_nchw: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize so the image covers (height, width), keeping its aspect, then centre-crop (as the data loader)."""
    h, w = x_nchw.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = resize_antialiased(x_nchw, nh, nw, "bilinear")
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top : top + height, left : left + width]


class ImageTooLarge(ValueError):
    """The image's header declares more pixels than allowed; raised before its pixels are decoded."""


def load_image(source: str | Path | BinaryIO, width: int, height: int, max_pixels: int | None = None) -> np.ndarray:
    """An image file (a path, or an open binary file such as the body of a request) → (1, 3, H, W) float32 in
    [−1, 1]. With `max_pixels`, a larger image is refused from its header, before decoding (decompression bombs)."""
    from PIL import Image

    name = source if isinstance(source, (str, Path)) else "the upload"
    try:
        img = Image.open(source)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageTooLarge(f"the image is {img.width}x{img.height}, more than the {max_pixels} pixels allowed: "
                                "send a smaller image")
        img = img.convert("RGB")
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError:  # Image.open refuses twice Pillow's MAX_IMAGE_PIXELS itself, from the header
        limit = 2 * Image.MAX_IMAGE_PIXELS
        allowed = f"the {max_pixels} allowed" if max_pixels is not None and max_pixels < limit else "Pillow decodes"
        raise ImageTooLarge(f"the image has more than {limit} pixels, more than {allowed}: "
                            "send a smaller image") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read image {name}: pass a PNG or JPEG file ({e})") from e
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)[None]
    return cover_crop(x, width, height) / np.float32(127.5) - np.float32(1.0)


def clip_pixels(image_nchw: np.ndarray, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """First frame in [−1, 1] → the CLIP image encoder's normalised (N, 3, size, size) input."""
    x = resize_antialiased(image_nchw, size, size, "bicubic")
    m, s = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (mean, std))
    return ((x + 1) / 2 - m) / s


def to_uint8_frames(pixels_fchw: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [−1, 1] → (F, H, W, 3) uint8 for a video writer."""
    x = np.round((np.clip(pixels_fchw.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)
