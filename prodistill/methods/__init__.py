"""Distillation methods. Each one owns its math and declares its optimiser phases; the trainer owns the loop.

`METHODS` maps a `--method` name to its class; classes are imported only when a run uses them.
"""

from __future__ import annotations

import importlib

from prodistill.methods.base import DistillationModels, Method, StepOutput

METHODS = {
    "osv": "prodistill.methods.osv:OSV",
    "lcm": "prodistill.methods.lcm:LCM",
    "mcm": "prodistill.methods.mcm:MCM",
    "avdm2": "prodistill.methods.avdm2:AVDM2",
    "decoder": "prodistill.methods.decoder:DecoderDistill",
}
"""Two-stage methods (OSV) train stage 1 and/or 2; single-stage methods run as stage 2 (consistency
distillation with an EMA target), so their checkpoints live in RUN/stage2/."""


def method_class(name: str) -> type[Method]:
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, models: DistillationModels, stage: int, generator) -> Method:
    return method_class(cfg.method)(cfg, models, stage, generator)


__all__ = ["METHODS", "DistillationModels", "Method", "StepOutput", "build_method", "method_class"]
