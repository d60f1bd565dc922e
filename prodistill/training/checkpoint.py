"""Checkpoints: weights as safetensors, training state (optimisers, schedulers, RNG, data position) beside them.

A checkpoint is a folder `ckpt-NNNNNNN/` written under a temporary name and renamed into place, and the
`latest` pointer is replaced atomically after it, so an interrupted save never damages the last good
checkpoint: a reader only ever sees complete folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from prodistill.atomic import atomic_write_text, save_tensors, umask_mode

STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST = "latest"


def save_checkpoint(stage_dir: Path, step: int, weights: dict[str, dict[str, Tensor]], state: dict,
                    meta: dict | None = None, keep: int = 3, move_in: dict[str, Path] | None = None) -> Path:
    """Write `stage_dir/ckpt-<step>/` atomically, point `latest` at it and keep the newest `keep` checkpoints.
    `move_in` names folders written beforehand (DCP's sharded optimizer state) that move inside it as `name`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=".tmp-ckpt-"))
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        for group, tensors in weights.items():
            save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{group}.safetensors")
        torch.save(state, tmp / STATE_FILE)
        for name, folder in (move_in or {}).items():
            os.replace(folder, tmp / name)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **(meta or {})}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(stage_dir / LATEST, final.name)
    for old in sorted(p for p in stage_dir.glob("ckpt-*") if p.is_dir())[:-keep or None]:
        if old != final and not (old / "BEST").exists():  # the best by validation FVD (prodistill.eval.validate)
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a stage, or None."""
    pointer = stage_dir / LATEST
    if pointer.is_file():
        path = stage_dir / pointer.read_text().strip()
        if (path / META_FILE).is_file():
            return path
    done = sorted(p for p in stage_dir.glob("ckpt-*") if (p / META_FILE).is_file())
    return done[-1] if done else None


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META_FILE).read_text())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (damaged on disk: prodistill writes them atomically)."""


@contextlib.contextmanager
def _reading(path: Path):
    """Turns a failure to read `path` into one sentence naming it; errors of what is done with the content (a state
    that does not fit the optimiser, running out of memory) pass as they are."""
    try:
        yield
    except (OSError, EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):  # torch.load's words for a bad file
            raise
        raise CheckpointError(f"the checkpoint file {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): it is "
                              f"damaged; remove {path.parent} to go back to an earlier checkpoint, or retrain") from e


def load_weights(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, dict[str, Tensor]]:
    out = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with _reading(path):
            out[path.stem] = load_file(str(path), device=str(device))
    return out


def load_state(ckpt: Path) -> dict:
    with _reading(ckpt / STATE_FILE):
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
