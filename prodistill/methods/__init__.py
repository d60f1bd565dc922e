"""Distillation methods. Each one owns its math and declares its optimiser phases; the trainer owns the loop.

`build_method(cfg, models, stage, generator)` picks the class named by `cfg.method`.
"""

from __future__ import annotations

from prodistill.methods.base import Method, StepOutput


def build_method(cfg, models, stage: int, generator) -> Method:
    if cfg.method == "osv":
        from prodistill.methods.osv import OSV

        return OSV(cfg, models, stage, generator)
    raise ValueError(f"unknown method {cfg.method!r}")


__all__ = ["Method", "StepOutput", "build_method"]
