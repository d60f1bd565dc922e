"""FP8 Linear layers where they measurably pay, by one written rule over a measured per-shape table.

Why a rule and not a switch: at SVD's layer widths (320-1280) FP8 *training* of a Linear measured slower than
BF16 on an H100 (TE, eager: 40320×1280→1280 fwd+bwd 0.79 ms bf16 vs 1.30 ms FP8) and no faster with torchao
under torch.compile; only large GEMMs won (8192³: 4.38 vs 2.85 ms) — ../shared/GPU.md. Converting every
Linear would make the step slower. So each layer is converted only where the table says FP8 wins for its
shape, and `explain` says which row decided.

The table (`fp8_table.json` beside this file, or `--fp8-table`) is written by `prodistill bench fp8` on the
GPU: one row per (role, M rows, K in, N out) the step runs, with milliseconds per column — `bf16` (nn.Linear,
eager cuBLAS), `te` (Transformer Engine, eager), `torchao` (torchao float8 under torch.compile) and
`torchao-eager`. Each FP8 column times the very `Fp8Linear` call the step makes (wrapper, scaling, casts and
GEMM). The shipped table holds only what was measured; empty, it converts nothing.

Roles: `infer` is the frozen teacher (forward only, no grad; its FP8 weights are quantized once); `train` is a
frozen layer the step differentiates through (student base layers, DINOv2: forward + gradient to the input,
no weight-gradient GEMM; weights quantized per call).

The rule, for a Linear of role r, K→N, called on M rows (M = input numel / K), backend b:
1. a layer whose weight or bias is trained (LoRA adapters, `--train-modules`) stays as it is: its fp32 master
   weight meets bf16 under autocast, and FP8 training of trained weights was not measured;
2. K or N not a multiple of 16 never converts, and a call whose M is not a multiple of 8 runs bf16 (FP8
   GEMMs need the flattened input's rows % 8 and columns % 16);
3. `te` is never used inside a torch.compile'd network: te.Linear is a graph break (TE 2.18-2.20) and
   regions compile with fullgraph=True; there `auto` uses torchao, and `--fp8-backend te` leaves the layer
   bf16 and says why;
4. the table row (r, M', K, N) with M' the measured M nearest to M, within a factor √2, decides: FP8 when
   its column's time ≤ (1 − MARGIN) × its bf16 time; no row means bf16. The column is `te` for te (and for
   `emulate`, which reproduces TE's numerics), `torchao` in a compiled network, `torchao-eager` elsewhere;
5. `auto` picks, per layer, the installed backend that saves the most measured time over the layer's rows.

A converted layer is an `Fp8Linear`: an `nn.Linear` holding the *same* weight and bias Parameters (names,
state dicts and the student/teacher weight sharing are unchanged) plus a backend kernel kept outside the
module tree; each call picks FP8 or bf16 by its M, so the teacher's CFG batch and the student's batch get
their own rows. A copy (`copy.deepcopy`) of an `Fp8Linear` is a plain `nn.Linear`: the student, a copy of
the teacher, gets its own conversion for its own role. LoRA on a converted base layer keeps training: peft's
`lora.Linear` calls `base_layer(x)` and adds its adapters' bf16 matmuls beside it.

`emulate` is the plain-torch twin (any device): activations and weights quantized to float8_e4m3fn with
per-tensor current scaling (gradients to float8_e5m2, as TE's HYBRID format), dequantized, multiplied in
fp32. It is slower than bf16 and exists so tests check the conversion, the rule and FP8's numerics on a CPU.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prodistill.accel import SpeedupError

MARGIN = 0.05
"""FP8 must be at least this much faster than bf16 on a row to be used there."""
ROLES = ("infer", "train")
BACKENDS = ("te", "torchao", "emulate")
COLUMNS = ("bf16", "te", "torchao", "torchao-eager", "emulate")
PACKAGED_TABLE = Path(__file__).with_name("fp8_table.json")
INSTALL_HINT = "pip install '.[fp8]' (transformer-engine[pytorch], torchao) or use the project's Docker image"
_PACKAGES = {"te": ("transformer_engine", "Transformer Engine"), "torchao": ("torchao", "torchao")}


class Fp8Unavailable(SpeedupError):
    """--fp8 asked for where it cannot run (no Hopper GPU, or the backend's package missing)."""


# -- the measured table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    role: str
    m: int
    k: int
    n: int
    ms: dict = field(default_factory=dict)
    """Median milliseconds per column (COLUMNS); a column absent was not measured."""
    count: int = 1
    """Calls of this shape per network forward (how much the row weighs in the step)."""
    note: str = ""
    """Why a column is missing (not eligible, backend absent, failed)."""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    """Where and how it was measured: device, versions, date, the step's shape."""
    source: str = "empty"

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Table":
        path = Path(path) if path else PACKAGED_TABLE
        data = json.loads(path.read_text())
        rows = [Row(r["role"], int(r["m"]), int(r["k"]), int(r["n"]), dict(r.get("ms", {})), int(r.get("count", 1)),
                    r.get("note", "")) for r in data.get("rows", [])]
        bad = sorted({r.role for r in rows} - set(ROLES))
        if bad:
            raise ValueError(f"{path}: unknown role(s) {', '.join(bad)} in the FP8 table; roles are {', '.join(ROLES)}")
        return cls(rows, data.get("meta", {}), str(path))

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": [{"role": r.role, "m": r.m, "k": r.k, "n": r.n, "ms": r.ms, "count": r.count,
                                             **({"note": r.note} if r.note else {})} for r in self.rows]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def for_shape(self, role: str, k: int, n: int) -> list[Row]:
        return sorted((r for r in self.rows if (r.role, r.k, r.n) == (role, k, n)), key=lambda r: r.m)


def eligible(m: int | None, k: int, n: int) -> str:
    """Why FP8 cannot run a GEMM of this shape ('' when it can)."""
    if k % 16 or n % 16:
        return f"K={k}, N={n}: FP8 GEMMs need both multiples of 16"
    if m is not None and m % 8:
        return f"M={m} rows: FP8 GEMMs need a multiple of 8"
    return ""


def nearest_m(measured: tuple[int, ...], m: int) -> int | None:
    """The measured M nearest to `m` on a log scale, if within a factor √2 (pure: dynamo folds it)."""
    best = None
    for r in measured:
        within = r * r <= 2 * m * m and m * m <= 2 * r * r
        if within and (best is None or abs(math.log2(r / m)) < abs(math.log2(best / m))):
            best = r
    return best


def wins(row: Row, column: str, margin: float = MARGIN) -> bool:
    """The rule's test on one row: FP8 (column) at least `margin` faster than bf16."""
    fp8, bf16 = row.ms.get(column), row.ms.get("bf16")
    return not eligible(row.m, row.k, row.n) and fp8 is not None and bf16 is not None and fp8 <= (1 - margin) * bf16


def column_for(backend: str, compiled: bool) -> str:
    if backend in ("te", "emulate"):
        return "te"
    return "torchao" if compiled else "torchao-eager"


# -- the per-layer decision -----------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    name: str
    role: str
    k: int
    n: int
    backend: str | None
    """The backend the layer runs FP8 with; None: the layer stays as it is."""
    fp8_m: tuple[int, ...] = ()
    """Measured M values at which the layer runs FP8."""
    measured_m: tuple[int, ...] = ()
    """All measured M values of its shape (a call is matched to the nearest within √2; others run bf16)."""
    reason: str = ""
    rows: list[str] = field(default_factory=list)
    """One line per table row of its shape: the figures and the verdict."""

    def line(self) -> str:
        decision = f"FP8 ({self.backend})" if self.backend else "bf16"
        text = f"{self.name}  {self.k}→{self.n}  {self.role}  {decision}: {self.reason}"
        return "\n".join([text] + [f"    {r}" for r in self.rows])


def plan_layer(name: str, linear: nn.Linear, role: str, compiled: bool, backends: tuple[str, ...],
               table: Table, margin: float = MARGIN) -> LayerPlan:
    """Apply the module docstring's rule to one Linear; `backends` are those allowed (and installed)."""
    k, n = linear.in_features, linear.out_features
    plan = LayerPlan(name, role, k, n, None)
    if any(p.requires_grad for p in linear.parameters()):
        plan.reason = "trained weight (LoRA adapter or --train-modules): stays in autocast bf16"
        return plan
    if why := eligible(None, k, n):
        plan.reason = why
        return plan
    rows = table.for_shape(role, k, n)
    plan.measured_m = tuple(r.m for r in rows)
    if not rows:
        plan.reason = f"no measured row for ({role}, K={k}, N={n}) in {table.source}: run `prodistill bench fp8`"
        return plan
    best, notes = None, []
    for backend in backends:
        if backend == "te" and compiled:
            notes.append("te not used: the network is torch.compile'd and te.Linear is a graph break")
            continue
        col = column_for(backend, compiled)
        won = [r for r in rows if wins(r, col, margin)]
        saved = sum((r.ms["bf16"] - r.ms[col]) * r.count for r in won)
        if won and (best is None or saved > best[1]):
            best = (backend, saved, tuple(r.m for r in won), col)
    for r in rows:
        cols = ", ".join(f"{c} {r.ms[c]:.3f}" for c in COLUMNS if c in r.ms)
        verdict = "FP8" if best and r.m in best[2] else "bf16"
        note = f" ({r.note})" if r.note else ""
        plan.rows.append(f"M={r.m} ×{r.count}: {cols or 'not measured'} ms → {verdict}{note}")
    if best is None:
        plan.reason = "; ".join(notes + [f"FP8 not ≥{margin:.0%} faster than bf16 at any measured M"])
        return plan
    plan.backend, plan.fp8_m = best[0], best[2]
    plan.reason = "; ".join(notes + [f"{best[3]} ≥{margin:.0%} faster at M={', '.join(map(str, best[2]))} "
                                     f"(saves {best[1]:.3f} ms per forward)"])
    return plan


# -- FP8 kernels ----------------------------------------------------------------------------------------------
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fake_quantize(t: Tensor, dtype: torch.dtype = E4M3) -> Tensor:
    """`t` through FP8 and back (fp32): per-tensor current scaling (amax of this very tensor), then the cast."""
    fmax = torch.finfo(dtype).max
    t = t.float()
    scale = fmax / t.abs().amax().clamp(min=1e-12)
    return (t * scale).clamp(-fmax, fmax).to(dtype).float() / scale


class _EmulatedGemm(torch.autograd.Function):
    """y = q(x)·q(W)ᵀ with E4M3 operands; dx = q(dy)·q(W) with dy in E5M2. W is frozen (no weight gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        wq = fake_quantize(w)
        ctx.save_for_backward(wq)
        ctx.x_dtype = x.dtype
        return fake_quantize(x) @ wq.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (wq,) = ctx.saved_tensors
        return (fake_quantize(grad, E5M2) @ wq).to(ctx.x_dtype), None


class EmulatedKernel:
    """The plain-torch twin of an FP8 Linear (numerics only: slower than bf16)."""

    def __init__(self, linear: nn.Linear, role: str):
        self.linear = linear

    def __call__(self, x: Tensor) -> Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            y = _EmulatedGemm.apply(x.reshape(-1, x.shape[-1]), self.linear.weight)
            if self.linear.bias is not None:
                y = y + self.linear.bias.float()
        return y.to(out_dtype).reshape(*x.shape[:-1], y.shape[-1])


@functools.cache
def import_backend(backend: str):
    """The backend's module (transformer_engine.pytorch, torchao), or Fp8Unavailable saying what to install."""
    module, pretty = _PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        raise Fp8Unavailable(f"--fp8-backend {backend} needs {pretty}, which is not installed: {INSTALL_HINT}")
    try:
        mod = importlib.import_module(module + (".pytorch" if backend == "te" else ""))
    except Exception as e:  # a partial install (TE's metapackage without its core wheel) fails in many ways
        raise Fp8Unavailable(f"--fp8-backend {backend}: {pretty} is installed but does not import "
                             f"({type(e).__name__}: {str(e)[:200]}): {INSTALL_HINT}") from None
    if backend == "te" and not hasattr(mod, "quantized_model_init"):
        raise Fp8Unavailable(f"--fp8-backend te needs Transformer Engine 2.9 or newer (te.autocast, "
                             f"quantized_model_init), found {getattr(mod, '__version__', 'an older one')}: "
                             f"{INSTALL_HINT}")
    return mod


class TEKernel:
    """A Transformer Engine Linear with the layer's weights, run inside TE's autocast with the
    Float8CurrentScaling recipe (HYBRID: E4M3 forward, E5M2 gradients) — the one place TE's context is
    entered. `infer` layers hold their weight in FP8, quantized once (quantized_model_init); `train` layers
    share the bf16 Parameter (frozen, so TE computes no weight gradient) and quantize it per call."""

    def __init__(self, linear: nn.Linear, role: str):
        te = import_backend("te")
        from transformer_engine.common.recipe import Float8CurrentScaling, Format

        self.te, self.recipe = te, Float8CurrentScaling(fp8_format=Format.HYBRID)
        w, b = linear.weight, linear.bias
        kw = dict(bias=b is not None, params_dtype=w.dtype, device=w.device)
        if role == "infer":
            with te.quantized_model_init(enabled=True, recipe=self.recipe):
                mod = te.Linear(linear.in_features, linear.out_features, **kw)
            with torch.no_grad():
                mod.weight.copy_(w)  # quantizes into the FP8 weight
                if b is not None:
                    mod.bias.copy_(b)
        else:
            mod = te.Linear(linear.in_features, linear.out_features, **kw)
            mod.weight = w
            if b is not None:
                mod.bias = b
        self.module = mod.requires_grad_(False)

    def __call__(self, x: Tensor) -> Tensor:
        with self.te.autocast(enabled=True, recipe=self.recipe):
            return self.module(x if x.is_contiguous() else x.contiguous())


class TorchaoKernel:
    """torchao float8: `train` layers are a Float8Linear (tensorwise dynamic scaling of input, weight and
    gradient) sharing the layer's Parameters; `infer` layers hold a weight quantized once to float8 (per-tensor
    scale) by torchao's inference path, activations quantized per call. Fused by inductor under torch.compile.
    Eager, Float8Linear computes a weight gradient even for a frozen weight and drops it (compiled, that GEMM
    is dead code): the table's `torchao-eager` and `torchao` columns each time the layer as it runs."""

    def __init__(self, linear: nn.Linear, role: str):
        import_backend("torchao")
        plain = _plain_linear(linear.weight, linear.bias)
        if role == "infer":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

            # set_inductor_config=False: leave the process's inductor settings to prodistill.accel.compile
            quantize_(plain, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(),
                                                                       set_inductor_config=False))
            self.module = plain
        else:
            from torchao.float8 import Float8LinearConfig
            from torchao.float8.float8_linear import Float8Linear

            self.module = Float8Linear.from_float(plain, config=Float8LinearConfig())

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)


KERNELS = {"te": TEKernel, "torchao": TorchaoKernel, "emulate": EmulatedKernel}


def _plain_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear holding these very Parameters (no new storage)."""
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = weight
    lin.bias = bias
    return lin


class Fp8Linear(nn.Linear):
    """An nn.Linear that runs FP8 for the input shapes its plan chose and bf16 for the others; same Parameters
    and names as the layer it replaced. The kernel lives outside the module tree (not a child), so
    parameters(), state_dict() and the compile regions see exactly the original layer."""

    def __init__(self, linear: nn.Linear, plan: LayerPlan):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.backend, self.role = plan.backend, plan.role
        self.measured_m, self.fp8_m = tuple(plan.measured_m), frozenset(plan.fp8_m)
        object.__setattr__(self, "kernel", KERNELS[plan.backend](linear, plan.role))

    def uses_fp8(self, m: int) -> bool:
        return m % 8 == 0 and nearest_m(self.measured_m, m) in self.fp8_m

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_fp8(x.numel() // self.in_features):
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)

    def as_linear(self) -> nn.Linear:
        return _plain_linear(self.weight, self.bias)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.as_linear(), memo)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.backend} at M≈{sorted(self.fp8_m)}"


# -- networks -------------------------------------------------------------------------------------------------
def installed(backend: str) -> bool:
    """Whether `backend` imports (and is recent enough) here; imports it, once."""
    if backend == "emulate":
        return True
    try:
        import_backend(backend)
    except Fp8Unavailable:
        return False
    return True


def backends_for(choice: str) -> tuple[str, ...]:
    """`auto`: every installed GPU backend (the rule then picks per layer); otherwise the one named."""
    return tuple(b for b in ("te", "torchao") if installed(b)) if choice == "auto" else (choice,)


def check_available(choice: str, device: torch.device) -> None:
    """Raise Fp8Unavailable (one sentence: what is missing and how to get it) unless `--fp8-backend choice`
    can run on `device`. Runs before any model is built; imports the backend (seconds for TE), so a partial
    install is caught here too."""
    if choice == "emulate":
        return
    if device.type != "cuda":
        raise Fp8Unavailable("--fp8 needs an NVIDIA Hopper-class GPU (compute capability 9.0+, e.g. H100/H200) "
                             "and --device cuda, but this run is on the CPU: run it on such a GPU (or use "
                             "--fp8-backend emulate to check FP8 numerics in plain torch)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        raise Fp8Unavailable(f"--fp8 needs a Hopper-class GPU (compute capability 9.0+, e.g. H100/H200), but "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}: run on an H100/H200 or "
                             "drop --fp8")
    if choice != "auto":
        import_backend(choice)
    elif not any(installed(b) for b in ("te", "torchao")):
        raise Fp8Unavailable(f"--fp8-backend auto needs Transformer Engine or torchao, and neither imports here: "
                             f"{INSTALL_HINT}")


def restore(network: nn.Module) -> int:
    """Put a plain nn.Linear (same Parameters) back in place of every Fp8Linear; returns how many."""
    count = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp8Linear):
                setattr(parent, name, child.as_linear())
                count += 1
    return count


def convert(network: nn.Module, prefix: str, role: str, compiled: bool, backend_choice: str, table: Table,
            margin: float = MARGIN) -> list[LayerPlan]:
    """Plan every nn.Linear of `network` (restored to bf16 first) and replace those the rule converts.
    Returns the plan of each layer, converted or not."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    restore(network)
    backends = backends_for(backend_choice)
    plans = []
    for parent_name, parent in list(network.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = ".".join(p for p in (prefix, parent_name, name) if p)
            plan = plan_layer(full, child, role, compiled, backends, table, margin)
            plans.append(plan)
            if plan.backend:
                setattr(parent, name, Fp8Linear(child, plan))
    return plans


def summary(plans: list[LayerPlan]) -> str:
    """One line: how many Linears of each network run FP8, and with which backend."""
    if not plans:
        return "FP8: no Linear layers"
    by_net: dict[str, list[LayerPlan]] = {}
    for p in plans:
        by_net.setdefault(p.name.split(".")[0], []).append(p)
    parts = []
    for net, ps in by_net.items():
        fp8 = [p for p in ps if p.backend]
        kinds = sorted({p.backend for p in fp8})
        parts.append(f"{net} {len(fp8)}/{len(ps)}" + (f" ({', '.join(kinds)})" if kinds else ""))
    return "FP8 Linear layers: " + ", ".join(parts)


def explain(plans: list[LayerPlan], only_fp8: bool = False) -> str:
    """The listing of `bench train --explain`: each layer, its shape, role, decision, and the rows that decided.
    Layers of one network with the same shape, role and decision are grouped under their first name."""
    groups: dict[tuple, list[LayerPlan]] = {}
    for p in plans:
        if only_fp8 and not p.backend:
            continue
        key = (p.name.split(".")[0], p.k, p.n, p.role, p.backend, p.reason, tuple(p.rows))
        groups.setdefault(key, []).append(p)
    lines = [summary(plans)]
    for members in groups.values():
        first = members[0]
        more = f" (+{len(members) - 1} more of this shape)" if len(members) > 1 else ""
        lines.append(first.line().replace(first.name, first.name + more, 1))
    return "\n".join(lines)
