"""`prodistill bench fp8`: measure bf16 against each FP8 backend at every Linear shape of the training step and
write the table that `prodistill.accel.fp8`'s rule reads.

Shapes come from the networks themselves, not from a list kept by hand: the preset's UNet runs once at the
teacher's CFG batch (2B, role `infer`) and once at the student's batch (B, role `train`), and DINOv2 once on
the B·F discriminator images (role `train`), all on fake tensors (no memory, no GPU, seconds), with a
hook on every nn.Linear recording its (M, K, N). Each distinct shape is then timed on the GPU:

- `bf16`: nn.Linear in bf16 (eager cuBLAS), the baseline (with a bias where the layers of that shape have one);
- `te`: the `Fp8Linear` TE kernel the step would run (TE autocast, Float8CurrentScaling, eager);
- `torchao-eager` and `torchao`: the torchao kernel, eager and under torch.compile (one compile per (role, K,
  N) with M dynamic, dynamo reset between them); compiled timing stops at `max_seconds`, rows left say so.

`infer` times a no-grad forward; `train` a forward plus the gradient to the input (the weight is frozen, as in
the step). Each figure is the median of `reps` timings after `warmup` untimed calls: GPU time per call from
replays of a CUDA graph (see `_timer`; per-call CUDA events where capture fails). Shapes FP8
cannot run (rows % 8, K or N % 16) are listed with the reason and not timed. A backend whose package is missing
is reported in one line and skipped; the others are still measured.
"""

from __future__ import annotations

import datetime
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prodistill.accel.fp8 import KERNELS, MARGIN, Fp8Unavailable, Row, Table, eligible, import_backend, wins
from prodistill.bench.profile import time_ms

BACKEND_COLUMNS = {"te": ("te",), "torchao": ("torchao-eager", "torchao"), "emulate": ("emulate",)}


@dataclass(frozen=True)
class Shape:
    role: str
    m: int
    k: int
    n: int


def step_linear_shapes(preset_name: str, width: int, height: int, frames: int, batch: int) -> tuple[Counter, set]:
    """(calls per network forward of every (role, M, K, N) the step's Linear layers run, the shapes of those
    among them that have a bias — timed with one)."""
    from diffusers import UNetSpatioTemporalConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prodistill.models.discriminator import build_dinov2
    from prodistill.models.presets import get_preset

    preset = get_preset(preset_name)
    factor = 2 ** (len(preset.vae["block_out_channels"]) - 1)
    h, w = height // factor, width // factor
    shapes: Counter = Counter()
    with_bias: set[Shape] = set()
    role = ["infer"]

    def record(module: nn.Linear, args) -> None:
        x = args[0]
        shape = Shape(role[0], x.numel() // x.shape[-1], module.in_features, module.out_features)
        shapes[shape] += 1
        if module.bias is not None:
            with_bias.add(shape)

    dino = build_dinov2(None, preset.name)  # real (small) weights: its init draws data-dependently
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        unet = UNetSpatioTemporalConditionModel(**preset.unet)
        for net in (unet, dino):
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.register_forward_pre_hook(record)
        cfg = unet.config
        for role[0], b in (("infer", 2 * batch), ("train", batch)):  # teacher CFG batch, student batch
            unet(torch.randn(b, frames, cfg.in_channels, h, w), torch.ones(b),
                 encoder_hidden_states=torch.randn(b, 1, cfg.cross_attention_dim),
                 added_time_ids=torch.randn(b, 3), return_dict=False)
        role[0] = "train"
        dino(pixel_values=torch.randn(batch * frames, 3, preset.disc_image_size, preset.disc_image_size))
    return shapes, with_bias


GRAPH_CALLS = 10
"""Calls captured in one CUDA graph by `time_ms`, so one replay's launch is shared by ten GEMMs."""


def _timer(device: torch.device, fn, reps: int, warmup: int) -> float:
    """Median milliseconds of `fn()` (`prodistill.bench.profile.time_ms`): on a GPU, GPU time from replays of a CUDA
    graph of `GRAPH_CALLS` calls — the step replays the teacher's solve as a graph and runs compiled regions whose
    launches the CPU queues ahead, so per-call launch and Python overhead (TE's and autograd's alone exceed a small
    GEMM) is not what the step pays; per call with CUDA events where a kernel cannot be captured."""
    return time_ms(device, fn, reps, warmup, calls=GRAPH_CALLS)



def _op(call, role: str, x: torch.Tensor, grad: torch.Tensor):
    if role == "infer":
        def run():
            with torch.no_grad():
                call(x)
    else:
        def run():
            torch.autograd.grad(call(x), x, grad)
    return run


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def measure(shapes: Counter, with_bias: set, backends: list[str], device: torch.device, reps: int = 30,
            warmup: int = 5, max_seconds: float = 120.0, echo=print) -> Table:
    """Time every shape in bf16 and each of `backends` (te, torchao, emulate) → the rule's table."""
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    present = []
    for b in backends:
        try:
            if b != "emulate":
                import_backend(b)
            present.append(b)
        except Fp8Unavailable as e:
            echo(f"{b}: not measured ({e}); measuring the others")
    groups: dict[tuple, list[Shape]] = {}
    for s in sorted(shapes, key=lambda s: (s.role, -s.m * s.k * s.n)):
        groups.setdefault((s.role, s.k, s.n, s in with_bias), []).append(s)
    ms: dict[Shape, dict] = {s: {} for s in shapes}
    notes: dict[Shape, list[str]] = {s: [] for s in shapes}
    compiled_groups = []
    for (role, k, n, bias), members in groups.items():
        lin = nn.Linear(k, n, bias=bias, device=device, dtype=dtype).requires_grad_(False)  # frozen, as in the step
        kernels = {}
        for b in present:
            try:
                kernels[b] = KERNELS[b](lin, role)
            except Exception as e:  # a backend that cannot build this layer is a finding, not a crash
                for s in members:
                    notes[s].append(f"{b}: {_short(e)}")
        for s in members:
            if why := eligible(s.m, s.k, s.n):
                notes[s].append(why)
                continue
            x = torch.randn(s.m, k, device=device, dtype=dtype, requires_grad=role == "train")
            grad = torch.randn(s.m, n, device=device, dtype=dtype)
            calls = {"bf16": lin, **{c: kernels[b] for b in kernels for c in BACKEND_COLUMNS[b] if c != "torchao"}}
            for col, call in calls.items():
                try:
                    ms[s][col] = _timer(device, _op(call, role, x, grad), reps, warmup)
                except Exception as e:
                    notes[s].append(f"{col}: {_short(e)}")
        if "torchao" in kernels:
            compiled_groups.append((role, kernels["torchao"], [s for s in members if not eligible(s.m, s.k, s.n)]))
    for role, kernel, members in compiled_groups:
        if time.perf_counter() - start > max_seconds:
            for s in members:
                notes[s].append(f"torchao (compiled): not measured within --max-seconds {max_seconds:.0f}")
            continue
        torch._dynamo.reset()
        compiled = torch.compile(kernel.__call__)  # M marked dynamic below: one compile per (role, K, N)
        for s in members:
            x = torch.randn(s.m, s.k, device=device, dtype=dtype, requires_grad=role == "train")
            torch._dynamo.mark_dynamic(x, 0)
            grad = torch.randn(s.m, s.n, device=device, dtype=dtype)
            try:
                ms[s]["torchao"] = _timer(device, _op(compiled, role, x, grad), reps, warmup)
            except Exception as e:
                notes[s].append(f"torchao (compiled): {_short(e)}")
    rows = [Row(s.role, s.m, s.k, s.n, {c: round(v, 5) for c, v in ms[s].items()}, shapes[s], "; ".join(notes[s]))
            for s in sorted(shapes, key=lambda s: (s.role, s.k, s.n, s.m))]
    return Table(rows, {"seconds": round(time.perf_counter() - start, 1), "backends": present})


def run_fp8_bench(preset: str, width: int, height: int, frames: int, batch: int, backends: list[str],
                  device: torch.device, reps: int, max_seconds: float, echo=print) -> Table:
    echo(f"collecting the Linear shapes of {preset} at {width}x{height}, {frames} frames, batch {batch} ...")
    shapes, with_bias = step_linear_shapes(preset, width, height, frames, batch)
    echo(f"{len(shapes)} distinct shapes ({sum(shapes.values())} calls); timing bf16 and {', '.join(backends)} ...")
    table = measure(shapes, with_bias, backends, device, reps=reps, max_seconds=max_seconds, echo=echo)
    table.meta.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, versions=_versions(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), preset=preset, resolution=f"{width}x{height}", frames=frames, batch_size=batch,
        reps=reps, margin=MARGIN, timing=f"GPU time per call: CUDA graph replays of {GRAPH_CALLS} calls" if
        device.type == "cuda" else "wall clock per call", command="prodistill bench fp8")
    return table


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("transformer-engine", "transformer_engine", "torchao"):
        try:
            out[dist.replace("_", "-")] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def format_fp8_table(table: Table) -> str:
    cols = [c for c in ("te", "torchao", "torchao-eager", "emulate") if any(c in r.ms for r in table.rows)]
    meta = table.meta
    lines = [f"bench fp8 on {meta.get('device', '?')} (torch {meta.get('torch', '?')}, {meta.get('versions', {})}), "
             f"{meta.get('preset', '?')} {meta.get('resolution', '?')}×{meta.get('frames', '?')} frames: median ms, "
             f"Δ vs bf16; FP8 where ≤ −{MARGIN:.0%}",
             f"{'role':6}{'M':>8}{'K':>6}{'N':>7}{'calls':>6}{'bf16':>9}" + "".join(f"{c:>20}" for c in cols)]
    for r in table.rows:
        cells = []
        for c in cols:
            v, base = r.ms.get(c), r.ms.get("bf16")
            star = "*" if c != "emulate" and wins(r, c) else " "  # emulate follows the te column's decisions
            cells.append(f"{v:8.3f} ({(v / base - 1) * 100:+4.0f}%){star}" if v and base else "-")
        bf16 = f"{r.ms['bf16']:9.3f}" if "bf16" in r.ms else f"{'-':>9}"
        lines.append(f"{r.role:6}{r.m:8d}{r.k:6d}{r.n:7d}{r.count:6d}{bf16}" + "".join(f"{c:>20}" for c in cells)
                     + (f"  {r.note}" if r.note else ""))
    lines.append("* = the rule converts this shape with that backend")
    return "\n".join(lines)


def write_fp8_json(table: Table, path: Path) -> Path:
    return table.save(path)
