"""The student's graphed forward/backward (`prodistill.accel.graphs.GraphedTrainCall`) on the CPU: its captures are
replaced by a twin whose "graphs" rerun the recorded call into the same static tensors, so that everything around
the capture — static inputs refilled, the autograd node, gradients reaching `.grad` and accumulating, the eager
fallbacks — is checked here; tests/test_gpu.py checks real CUDA graphs against eager."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from prodistill.accel.graphs import GraphedTrainCall, _TrainGraphs


class _Rerun:
    """Stands in for a `torch.cuda.CUDAGraph`: `replay` reruns what was recorded."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


class TwinGraphedTrainCall(GraphedTrainCall):
    """`GraphedTrainCall` whose forward "graph" reruns the call on the static inputs and writes the static output,
    and whose backward "graph" differentiates that run into the static gradient buffers."""

    def _capture_one(self, structure, inputs, params):
        static_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        args = self._rebuild(structure, static_in)
        wrt = (*(t for t in static_in if t.requires_grad), *params)
        with torch.enable_grad():
            first = self.fn(*args)
            grads = torch.autograd.grad(first, wrt, torch.ones_like(first), allow_unused=True)
        out, live = torch.empty_like(first.detach()), {}
        grad_out = torch.empty_like(out)
        grads = tuple(None if g is None else torch.empty_like(g) for g in grads)

        def forward():
            with torch.enable_grad():
                live["out"] = self.fn(*args)
            out.copy_(live["out"].detach())

        def backward():
            for buf, g in zip(grads, torch.autograd.grad(live.pop("out"), wrt, grad_out, allow_unused=True)):
                if buf is not None:
                    buf.copy_(g)

        return _TrainGraphs(_Rerun(forward), _Rerun(backward), static_in, out, grad_out, grads, params)


@dataclass
class Cond:
    scale: Tensor
    shift: Tensor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.base = nn.Parameter(torch.randn(6, 6, generator=gen), requires_grad=False)  # frozen, like the UNet
        self.lora = nn.Parameter(torch.randn(6, 6, generator=gen) * 0.1)
        self.bias = nn.Parameter(torch.randn(6, generator=gen))
        self.unused = nn.Parameter(torch.zeros(3))  # trainable but not in the forward (a skipped projection's LoRA)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return torch.tanh(x @ (self.base + self.lora) + self.bias) * cond.scale / sigma + cond.shift


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 6, generator=gen), torch.rand(1, generator=gen) + 0.5,
            Cond(torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)))


def _grads(net: Net) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


def test_graphed_train_call_matches_eager_outputs_and_gradients_on_fresh_inputs():
    net = Net()
    graphed = TwinGraphedTrainCall(net, lambda: [p for p in net.parameters()])
    for seed in range(3):
        args = _inputs(seed)
        want = net(*args)
        (want.square().sum()).backward()
        eager = _grads(net)
        net.zero_grad(set_to_none=True)
        got = graphed(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (got.square().sum()).backward()
        assert _grads(net).keys() == eager.keys()
        for name, g in _grads(net).items():
            if name in ("base", "unused"):
                assert g is None and eager[name] is None  # frozen, and unused: no gradient, as eagerly
            else:
                torch.testing.assert_close(g, eager[name], rtol=1e-6, atol=1e-7)
        net.zero_grad(set_to_none=True)
    ((entry,),) = graphed.graphs.values()  # one signature, captured once, replayed on every call
    assert entry.forward.replays == 3 and entry.backward.replays == 3


def test_graphed_train_call_accumulates_into_existing_grads_and_hands_out_its_own_output():
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters)
    args = _inputs(0)
    first = graphed(*args)
    first.sum().backward()
    once = net.lora.grad.clone()
    second = graphed(*args)
    second.sum().backward()  # micro-batches: gradients add up in .grad
    torch.testing.assert_close(net.lora.grad, 2 * once)
    ((entry,),) = graphed.graphs.values()
    assert net.lora.grad.data_ptr() != entry.grads[0].data_ptr()  # .grad is autograd's, not the graph's buffer
    assert first.data_ptr() != second.data_ptr()  # a caller's output is not rewritten by the next replay
    torch.testing.assert_close(first, second.detach())


def test_graphed_train_call_runs_eagerly_without_grad_and_while_a_backward_is_pending():
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters)
    a, b = _inputs(0), _inputs(1)
    with torch.no_grad():
        out = graphed(*a)
    assert not graphed.graphs and out.grad_fn is None  # previews and samplers: the plain call
    out_a = graphed(*a)
    out_b = graphed(*b)  # a second differentiated call before the first's backward: eager, or it would overwrite
    ((entry,),) = graphed.graphs.values()
    assert entry.forward.replays == 1
    (out_a.sum() + out_b.sum()).backward()
    got = _grads(net)
    net.zero_grad(set_to_none=True)
    (net(*a).sum() + net(*b).sum()).backward()
    torch.testing.assert_close(got["lora"], net.lora.grad, rtol=1e-6, atol=1e-7)
    net.zero_grad(set_to_none=True)
    graphed(*a)  # an output dropped without backward (a step redone after running out of memory) ...
    graphed(*b).sum().backward()  # ... does not keep the next call from replaying
    assert entry.forward.replays == 3 and entry.backward.replays == 2


def test_graphed_train_call_runs_eagerly_while_the_compiler_is_busy():
    net = Net()
    busy = [True]
    graphed = TwinGraphedTrainCall(net, net.parameters, ready=lambda: not busy[0])
    args = _inputs(0)
    graphed(*args).sum().backward()
    graphed(*args).sum().backward()
    assert not graphed.graphs  # regions still compiling in the background: eager steps
    busy[0] = False
    graphed(*args).sum().backward()
    assert len(graphed.graphs) == 1


def test_graphed_train_call_passes_the_gradient_of_an_input_that_requires_grad():
    """The discriminator judging the student's sample in the generator update: the gradient reaches the sample (and
    through it what made it) as eagerly; the same tensors without grad are another signature."""
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters)
    x, sigma, cond = _inputs(0)
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
    for fn in (net, graphed):
        (fn(x @ w, sigma, cond).square().sum()).backward()
        if fn is net:
            want_w, want_lora = w.grad.clone(), net.lora.grad.clone()
            w.grad = net.lora.grad = None
    torch.testing.assert_close(w.grad, want_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.lora.grad, want_lora, rtol=1e-6, atol=1e-6)
    graphed(x, sigma, cond).sum().backward()
    assert len(graphed.graphs) == 2


def test_graphed_train_call_captures_as_many_slots_as_calls_were_in_flight():
    """Real and fake judged before one backward: the first step replays the first call and runs the second eagerly
    (no capture while a graph of this wrapper is alive), the next step captures a second slot and replays both; a
    third call in flight runs eagerly (two slots at most); the gradients are the eager ones."""
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters, slots=2)
    a, b, c = _inputs(0), _inputs(1), _inputs(2)
    for _ in range(3):
        (graphed(*a).sum() - graphed(*b).square().sum() + graphed(*c).mean()).backward()
        got = net.lora.grad.clone()
        net.zero_grad(set_to_none=True)
    (net(*a).sum() - net(*b).square().sum() + net(*c).mean()).backward()
    torch.testing.assert_close(got, net.lora.grad, rtol=1e-6, atol=1e-6)
    (captures,) = graphed.graphs.values()
    assert [e.forward.replays for e in captures] == [3, 2]


def test_graphed_train_call_captures_only_while_none_of_its_graphs_is_alive():
    """A graph of an earlier call still alive (its loss kept, even after backward) holds the parameters'
    gradient-accumulator nodes: the capture waits for a call made after it is dropped."""
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters)
    args = _inputs(0)
    kept = graphed(*args).sum()  # nothing alive: captured and replayed
    kept.backward()  # the backward ran, but `kept` holds the graph
    graphed.reset()  # forget the capture (as after a resolution switch)
    again = graphed(*args).sum()
    assert not graphed.graphs  # the earlier graph alive: this call ran eagerly
    again.backward()
    del kept, again
    graphed(*args).sum().backward()
    assert len(graphed.graphs) == 1  # nothing alive any more: captured


@pytest.mark.parametrize("option", ["grad_checkpointing", "fp8"])
def test_student_graphs_are_refused_with_grad_checkpointing_and_fp8(tmp_path, option):
    from prodistill.accel import SpeedupError, Speedups, accelerate
    from prodistill.methods import build_method
    from prodistill.training.run import build_models

    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    models = build_models(cfg, torch.device("cpu"))
    method = build_method(cfg, models, 2, torch.Generator().manual_seed(0))
    speedups = Speedups(cuda_graphs=True, graph_train=True, **{option: True})
    with pytest.raises(SpeedupError, match="CUDA graphs of the training passes"):
        accelerate(method, models, speedups)


def test_graphed_calls_run_eagerly_inside_an_autocast_that_caches_weights():
    """A capture inside an outer autocast (weight cache on) would record the warm-up's cast of the trainable weights
    and replay it after they change; the wrapper runs such calls eagerly, and captures under cache_enabled=False."""
    net = Net()
    graphed = TwinGraphedTrainCall(net, net.parameters)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphed(*_inputs(0)).float().sum().backward()
    assert not graphed.graphs
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        graphed(*_inputs(0)).float().sum().backward()
    assert len(graphed.graphs) == 1


@pytest.mark.parametrize("method_name,stage", [("osv", 1), ("osv", 2), ("mcm", 2)])
def test_training_steps_with_graphed_student_and_discriminator_track_eager(tmp_path, method_name, stage):
    """Three training steps with the student's denoiser and the discriminator's logits behind the twin (generator
    update: the discriminator differentiated into the student's sample; discriminator update: real and fake in two
    slots) give the eager run's losses, and the replays did run."""
    from conftest import make_trainer, tiny_config
    from prodistill.training.logger import read_metrics

    losses = {}
    for name in ("eager", "graphed"):
        cfg = tiny_config(tmp_path, method=method_name, stage=str(stage), max_steps=3, out=str(tmp_path / name))
        trainer, method, _ = make_trainer(cfg, tmp_path / name, stage=stage, total_steps=3)
        if name == "graphed":
            method.student_d = TwinGraphedTrainCall(method.student_d, method.trainable.values)
            method.disc_logits = TwinGraphedTrainCall(method.disc_logits, method.disc.parameters, slots=2)
        trainer.fit()
        losses[name] = [(r["loss/g_total"], r["loss/d"]) for r in read_metrics(tmp_path / name) if "loss/d" in r]
    assert len(losses["graphed"]) == len(losses["eager"]) == 3
    for got, want in zip(losses["graphed"], losses["eager"]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    student = [e for captures in method.student_d.graphs.values() for e in captures]
    disc = [e for captures in method.disc_logits.graphs.values() for e in captures]
    assert sum(e.backward.replays for e in student) == 3  # every generator update replayed (captured at step 1)
    # generator update (the sample requires grad), and real and fake of the discriminator update: the fake ran
    # eagerly in step 1 (the real's graph alive) and has its own capture from step 2
    assert sorted(e.backward.replays for e in disc) == [2, 3, 3]
