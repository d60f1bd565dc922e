"""Validation during training (`prodistill train --val-data DIR --val-every N`): the student's FVD, CLIP
similarity to the conditioning image and temporal consistency on a small fixed held-out set, logged with the
training metrics (and TensorBoard), and the best checkpoint by FVD marked.

The set is the first `--val-videos` clips of `--val-data` (clip positions and conditioning noise seeded by
`--seed`), the generation the method's own preview (its default student sampler, from a generator seeded per
clip), so two validations of the same weights give the same numbers. The real clips' statistics are computed
once per run and kept in `RUN/val/real-stats.npz`. The best validation is recorded in `RUN/val/best.json`, and
its checkpoint folder holds a `BEST` marker that checkpoint pruning (`--keep-ckpts`) leaves alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from prodistill.eval.features import clip_scores, load_clip, load_video_features
from prodistill.eval.frechet import GaussianStats, frechet_distance
from prodistill.eval.run import real_set_meta

log = logging.getLogger("prodistill")

BEST_MARKER = "BEST"


class Validator:
    def __init__(self, cfg, models, run_dir: Path, videos: list):
        from prodistill.data.dataset import VideoClipDataset

        self.cfg, self.models, self.folder = cfg, models, Path(run_dir) / "val"
        width, height = cfg.size()
        self.dataset = VideoClipDataset(videos[: cfg.val_videos], cfg.frames, cfg.fps, (width, height), seed=cfg.seed)
        self.video_net = load_video_features(cfg.val_i3d, models.device)
        self.clip = load_clip(None, models)
        self.meta = real_set_meta(cfg, self.video_net.name, cfg.val_data, len(self.dataset), cfg.seed)
        self.real: GaussianStats | None = None

    def _clips(self):
        for i in range(len(self.dataset)):
            j, real, _ = self.dataset.first_good(i, self.dataset.load)
            yield i, real, self.dataset.cond_noise(j)

    def _cached_real_stats(self) -> GaussianStats | None:
        """The real clips' statistics of an earlier validation of this run (this process, or its file)."""
        path = self.folder / "real-stats.npz"
        if self.real is None and path.is_file():
            stats = GaussianStats.load(path)
            self.real = stats if stats.meta == self.meta else None
        return self.real

    @torch.no_grad()
    def __call__(self, method, score: bool = True) -> dict[str, float]:
        """The validation metrics of `method`'s current student; score=False (ranks other than 0) generates the
        videos only, as every rank must with FSDP."""
        dev = self.models.device
        feats, scores, real_feats = [], [], []
        real_stats = self._cached_real_stats() if score else None
        for i, real, noise in self._clips():
            generator = torch.Generator(dev).manual_seed(self.cfg.seed * 1_000_003 + i)
            batch = {"pixels": real[None].to(dev), "cond_noise": noise[None].to(dev)}
            video = method.preview(batch, generator)[0].float().cpu()
            if not score:
                continue
            feats.append(self.video_net(video[None])[0])
            scores.append(clip_scores(video, real[0], self.clip))
            if real_stats is None:  # the first validation: the real clips' features from the clips read here
                real_feats.append(self.video_net(real[None])[0])
        if not score:
            return {}
        if real_stats is None:
            real_stats = self.real = GaussianStats.of(np.stack(real_feats), self.meta)
            self.real.save(self.folder / "real-stats.npz")
        s = np.array(scores)
        return {"val/fvd": frechet_distance(real_stats, GaussianStats.of(np.stack(feats))),
                "val/clip_image_similarity": float(s[:, 0].mean()), "val/temporal_consistency": float(s[:, 1].mean())}

    def mark_if_best(self, metrics: dict[str, float], stage: int, step: int, checkpoint: Path | None) -> bool:
        """Record this validation in best.json and move the BEST marker to `checkpoint` when its FVD is the lowest
        so far (of any stage) at this resolution; returns whether it was. FVDs at different resolutions do not
        compare (`--stage1-resolution`): the first validation at a new one starts the record afresh."""
        path = self.folder / "best.json"
        best = json.loads(path.read_text()) if path.is_file() else None
        resolution = self.meta["resolution"]
        if best is not None and best.get("resolution", resolution) == resolution and best["fvd"] <= metrics["val/fvd"]:
            return False
        if best is not None and best.get("checkpoint"):
            (Path(best["checkpoint"]) / BEST_MARKER).unlink(missing_ok=True)
        if checkpoint is not None:
            (checkpoint / BEST_MARKER).write_text(f"stage {stage} step {step} FVD {metrics['val/fvd']}\n")
        record = {"stage": stage, "step": step, "fvd": metrics["val/fvd"], "resolution": resolution,
                  "checkpoint": str(checkpoint) if checkpoint is not None else None}
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        log.info("validation: best FVD so far (%.4g) at stage %d step %d", metrics["val/fvd"], stage, step)
        return True
