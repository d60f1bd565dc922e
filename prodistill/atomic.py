"""Atomic file writes and safetensors files with ordinary permissions: write beside the target, then `os.replace`, so a reader (or a resumed run) only ever
sees the old file or the complete new one. Files get the mode the user's umask gives ordinary files
(`mkstemp` alone would leave them private)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask_mode(mode: int) -> int:
    """`mode` with the process umask applied, as `open()` would create it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_temp(path: Path) -> str:
    """A new empty temporary file beside `path` with ordinary permissions; the caller replaces `path` with it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.chmod(tmp, umask_mode(0o666))
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    tmp = atomic_temp(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(tensors: dict, path: str | Path) -> None:
    """safetensors' save_file, then the umask's ordinary file mode (safetensors creates its files private)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, umask_mode(0o666))


def folder_problem(path: str | Path, flag: str, given: str | Path | None = None) -> str | None:
    """One sentence saying why a folder could not be made or written at `path` (for `flag`, whose value was `given`,
    by default `path`), or None: checked by making (and removing) a temporary folder in the nearest existing one,
    so that a run is refused before any model is built rather than failing when it first writes."""
    path = Path(path).expanduser().absolute()
    given = path if given is None else given
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {given}: {existing} is a file, not a folder; choose another {flag}"
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        return f"{flag} {given} cannot be written ({e.strerror} in {existing}); choose another {flag}"
    return None


def file_problem(path: str | Path, flag: str, suffix: str | None = None) -> str | None:
    """One sentence saying why a file cannot be written at `path` (given as `flag`; `suffix`: the ending its format
    needs), or None: `folder_problem` for its folder, so that a command is refused before its work rather than
    losing the results when it writes them."""
    if suffix is not None and Path(path).suffix.lower() != suffix:
        return f"{flag} {path}: give a file path ending in {suffix}"
    if Path(path).expanduser().is_dir():
        return f"{flag} {path} is a folder, not a file; choose a file path for {flag}"
    return folder_problem(Path(path).expanduser().absolute().parent, flag, path)
