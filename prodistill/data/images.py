"""A folder of images as a source of real frames (MCM's `--image-data`: high-quality images that the frame
discriminator treats as real, so the student's frames move towards them).

Which images a step reads is drawn by the method from its seeded generator, so the folder keeps no position
of its own and a resumed run reads the same images. An image that cannot be decoded is skipped with a
warning (the next file in order is read instead) and counted; it never stops a run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from prodistill.data.dataset import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, sorted); a DataError when there is none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"--image-data {folder}: not a folder; pass a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"--image-data {folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                        "pass a folder of images, or leave the flag out to use frames of the training videos")
    return files


class ImageFolder:
    def __init__(self, folder: str | Path):
        self.files = list_images(folder)
        self.skipped = 0
        """Reads that failed (and were replaced by the next file)."""

    def __len__(self) -> int:
        return len(self.files)

    def load(self, indices: list[int], width: int, height: int) -> Tensor:
        """Images `indices` → (N, 3, H, W) in [−1, 1], each resized to cover (W, H) and centre-cropped."""
        return torch.cat([self._read(i, width, height) for i in indices])

    def _read(self, index: int, width: int, height: int) -> Tensor:
        from prodistill.sampling import load_image

        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            try:
                return load_image(path, width, height)
            except ValueError as e:
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=3)
        raise DataError(f"--image-data: none of the {len(self.files)} images could be read; check the folder")
