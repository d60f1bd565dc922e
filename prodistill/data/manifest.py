"""Dataset manifests: one row per video, as CSV (the OpenVid-1M CSV layout works as is) or JSON lines.

Recognised columns (first match wins, case-insensitive): the path in `path`, `video`, `file`, `filename` or
`video_path`; optional `caption`/`text`/`prompt`, `fps`, and a frame count in `frames`/`frame`/`num_frames`.
Known fps and frame counts let the loader skip probing the file. Relative paths are resolved against
`video_root` (default: the manifest's folder). Rows whose file is missing are reported before training
starts and left out; a manifest where no file exists is an error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

PATH_KEYS = ("path", "video", "file", "filename", "video_path")
CAPTION_KEYS = ("caption", "text", "prompt")
FPS_KEYS = ("fps",)
FRAME_KEYS = ("frames", "frame", "num_frames")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    caption: str | None = None
    fps: float | None = None
    num_frames: int | None = None


def _pick(row: dict, keys: tuple[str, ...]):
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    for k in keys:
        v = lower.get(k)
        if v not in (None, ""):
            return v
    return None


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); a .jsonl manifest holds one "
                                 "JSON object per line") from None
    return rows


def read_manifest(path: str | Path, video_root: str | Path | None = None) -> tuple[list[VideoEntry], list[Path]]:
    """(entries whose file exists, paths of rows whose file is missing)."""
    from prodistill.data.dataset import DataError

    path = Path(path).expanduser()
    root = Path(video_root).expanduser() if video_root else path.parent
    entries, missing = [], []
    for n, row in enumerate(_rows(path), 1):
        raw = _pick(row, PATH_KEYS)
        if raw is None:
            raise DataError(f"{path}: row {n} has no video path; name the column one of {', '.join(PATH_KEYS)}")
        file = Path(raw).expanduser()
        file = file if file.is_absolute() else root / file
        if not file.is_file():
            missing.append(file)
            continue
        fps, frames = _pick(row, FPS_KEYS), _pick(row, FRAME_KEYS)
        entries.append(VideoEntry(file, _pick(row, CAPTION_KEYS), float(fps) if fps is not None else None,
                                  int(float(frames)) if frames is not None else None))
    if not entries:
        hint = f", e.g. {missing[0]}" if missing else ""
        raise DataError(f"{path}: none of its {len(missing)} rows points at an existing file{hint}; "
                        "check the paths or pass --video-root")
    return entries, missing
