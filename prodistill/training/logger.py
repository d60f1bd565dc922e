"""Metrics: one JSON line per logged step in RUN/metrics.jsonl, a console summary, TensorBoard if asked.

Values arrive as device tensors and are fetched in one transfer per logging interval, which is the loop's
only host synchronisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked by run_training before any work

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop rows of `stage` past `step` (logged before an interruption, about to be recomputed)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line and not (json.loads(line)["stage"] == stage and json.loads(line)["step"] > step)]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, stage: int, rows: list[tuple[int, dict[str, Tensor | float]]]) -> dict[str, float]:
        """Fetch and write the buffered rows (device tensors in one transfer, host floats as they are);
        returns the last row as floats (for the progress bar)."""
        if not rows:
            return {}
        keys = sorted(rows[-1][1])
        device_keys = [k for k in keys if isinstance(rows[-1][1][k], Tensor)]
        fetched = (torch.stack([torch.stack([r[k].float() for k in device_keys]) for _, r in rows]).cpu().tolist()
                   if device_keys else [[] for _ in rows])
        values = [[dict(zip(device_keys, dev)).get(k, r.get(k)) for k in keys] for (_, r), dev in zip(rows, fetched)]
        with self.path.open("a") as f:
            for (step, _), vals in zip(rows, values):
                rec = {"stage": stage, "step": step, **dict(zip(keys, vals))}
                f.write(json.dumps(rec) + "\n")
                if self.tb is not None:
                    for k, v in zip(keys, vals):
                        self.tb.add_scalar(f"stage{stage}/{k}", v, step)
        return dict(zip(keys, values[-1]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
