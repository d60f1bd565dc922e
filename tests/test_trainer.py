"""The generic loop on a toy method with known gradients: accumulation, clipping, warm-up, phase order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_config
from prodistill.methods.base import Method, StepOutput
from prodistill.training.logger import MetricsLogger, read_metrics
from prodistill.training.trainer import Trainer, warmup_schedule


class Toy(Method):
    """loss_g = (w − x)², loss_d = (v − x)² per micro-batch; records the gradient the optimiser saw."""

    phases = ("generator", "discriminator")

    def __init__(self):
        self.w, self.v = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.seen, self.order, self.generator = [], [], torch.Generator()

    def parameters(self, phase):
        return [self.w] if phase == "generator" else [self.v]

    def compute(self, phase, batch, cache):
        self.order.append((phase, float(batch["x"])))
        p = self.w if phase == "generator" else self.v
        loss = ((p - batch["x"]) ** 2).sum()
        return StepOutput(loss, {f"loss/{phase}": loss.detach()}, {"x": batch["x"]})

    def weights(self):
        return {"toy": {"w": self.w, "v": self.v}}

    def after_optimizer_step(self, phase):
        self.seen.append((phase, self.parameters(phase)[0].grad.item()))


class Numbers:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": torch.tensor([float(self.i)])}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_accumulation_averages_gradients_and_phases_share_micro_batches(tmp_path):
    cfg = tiny_config(tmp_path, grad_accum=2, max_steps=1, grad_clip=0.0)
    toy = Toy()
    Trainer(cfg, toy, Numbers(), 1, tmp_path / "s", 1, toy.generator, MetricsLogger(tmp_path)).fit()
    # d/dw of ((w−1)² + (w−2)²)/2 at w = 0 is (−2 − 4)/2 = −3
    assert toy.seen == [("generator", -3.0), ("discriminator", -3.0)]
    assert toy.order == [("generator", 1.0), ("generator", 2.0), ("discriminator", 1.0), ("discriminator", 2.0)]
    row = read_metrics(tmp_path)[0]
    assert row["loss/generator"] == 2.5  # (1 + 4)/2
    assert row["grad_norm/generator"] == 3.0


def test_clipping_limits_the_update(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1, grad_clip=0.5)
    toy = Toy()
    Trainer(cfg, toy, Numbers(), 1, tmp_path / "s", 1, toy.generator, MetricsLogger(tmp_path)).fit()
    assert toy.seen[0][1] == pytest.approx(-0.5, rel=1e-5)  # gradient −2 clipped to norm 0.5
    assert read_metrics(tmp_path)[0]["grad_norm/generator"] == 2.0  # the norm before clipping is logged


def test_warmup_schedule():
    f = warmup_schedule(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_schedule(0)(0) == 1.0
