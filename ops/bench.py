"""Micro-benchmark of the fused ops, forward+backward, against the plain-torch reference run eagerly and
against what torch.compile generates for the same reference expression.

    python3 -m ops.bench [--json PATH]            # on a GPU: the real shapes, bf16, all three variants
    python3 -m ops.bench --device cpu --json PATH  # tiny shapes, reference and compiled only (CI smoke run)

Real shapes (one 14-frame clip): the upsampler on 14×4×64×64 latents with r = 4 (→ 256², then resized to
224² outside the op) and on 14×4×56×56 (→ 224² directly); the pseudo-Huber distance on one sample of
14×4×64×64 and of 14×4×128×72 latents (576×1024 video), with only the prediction needing a gradient, as
in OSV. Each timing is the median of repeated forward+backward calls after warm-up (GPU:
`triton.testing.do_bench`, which clears L2 between calls; CPU: wall clock). `compile_s` is the first call
of the compiled variant (compiling). `rel_err` is ‖out − out_eager‖/‖out_eager‖ of the forward output.
The table is printed last; the exit status is 1 when any variant failed (its row says why).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import ops
from ops.huber import pseudo_huber_reference
from ops.upsampler import latent_upsampler_reference

EPS = 1e-5


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    r: int = 4

    @property
    def label(self) -> str:
        shape = "×".join(map(str, self.shape))
        if self.op == "upsampler":
            n, _, h, w = self.shape
            return f"{shape} r={self.r} → {h * self.r}×{w * self.r}"
        return shape


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    variant: str
    ms: float | None = None
    compile_s: float | None = None
    rel_err: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    error: str | None = None


GPU_CASES = [
    Case("upsampler", (14, 4, 64, 64), torch.bfloat16),
    Case("upsampler", (14, 4, 56, 56), torch.bfloat16),
    Case("pseudo_huber", (1, 14, 4, 64, 64), torch.bfloat16),
    Case("pseudo_huber", (1, 14, 4, 128, 72), torch.bfloat16),
]
CPU_CASES = [
    Case("upsampler", (2, 4, 8, 8), torch.float32),
    Case("pseudo_huber", (2, 3, 4, 8, 8), torch.float32),
]


def _inputs(case: Case, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(all inputs, those needing a gradient, the gradient fed to the output); random, never zeros."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        t = torch.randn(shape, generator=gen) * scale + shift
        return t.to(device=device, dtype=case.dtype)

    if case.op == "upsampler":
        n, cin, h, w = case.shape
        c = 3
        args = [rand(n, cin, h, w), rand(c * case.r**2, cin, 3, 3, scale=0.3), rand(c * case.r**2, scale=0.1),
                rand(c, scale=0.1, shift=1.0), rand(c, scale=0.1)]
        for a in args:
            a.requires_grad_()
        return args, args, rand(n, c, h * case.r, w * case.r)
    target, prediction = rand(*case.shape), rand(*case.shape)
    prediction.requires_grad_()
    return [target, prediction], [prediction], torch.rand(case.shape[0], generator=gen).to(device) + 0.5


def _function(case: Case, variant: str) -> Callable:
    if case.op == "upsampler":
        reference = lambda *a: latent_upsampler_reference(*a, case.r, EPS)  # noqa: E731
        fused = lambda *a: ops.fused_latent_upsampler(*a, case.r, EPS, fused=True)  # noqa: E731
    else:
        c = 0.00054 * (torch.Size(case.shape[1:]).numel() ** 0.5)  # iCT's c, as prodistill uses it
        reference = lambda x, y: pseudo_huber_reference(x, y, c)  # noqa: E731
        fused = lambda x, y: ops.pseudo_huber(x, y, c, fused=True)  # noqa: E731
    return fused if variant == "fused" else reference


def _median_ms(step: Callable[[], None], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=25, rep=100, return_mode="median"))
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(case: Case, device: torch.device, variants: list[str], backend: str, reps: int) -> list[Row]:
    inputs, wanted, grad_out = _inputs(case, device)
    rows, outputs = [], {}
    for variant in variants:
        row = Row(case.op, case.label, str(case.dtype).removeprefix("torch."), variant)
        rows.append(row)
        try:
            fn = _function(case, variant)
            compile_s = None
            if variant == "compiled":
                torch._dynamo.reset()
                fn = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
                start = time.perf_counter()
                torch.autograd.grad(fn(*inputs), wanted, grad_out)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - start

            def step():
                torch.autograd.grad(fn(*inputs), wanted, grad_out)

            outputs[variant] = fn(*inputs).detach().float()  # with grad on, as timed: no second compile
            row.ms, row.compile_s = _median_ms(step, device, reps), compile_s
        except Exception as e:  # a failed variant is reported in its row; the others still run
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    by_variant = {row.variant: row for row in rows}
    eager, compiled = by_variant.get("eager"), by_variant.get("compiled")
    for row in rows:
        if row.variant in outputs and "eager" in outputs:
            ref = outputs["eager"]
            row.rel_err = float((outputs[row.variant] - ref).norm() / ref.norm().clamp_min(1e-30))
        if row.ms:
            if eager and eager.ms:
                row.speedup_vs_eager = eager.ms / row.ms
            if compiled and compiled.ms:
                row.speedup_vs_compiled = compiled.ms / row.ms
    return rows


def format_table(rows: list[Row]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = f"{'op':<13} {'shape':<28} {'dtype':<9} {'variant':<9} {'ms':>9} {'×eager':>7} {'×compiled':>9} " \
             f"{'compile_s':>9} {'rel_err':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r.op:<13} {r.shape:<28} {r.dtype:<9} {r.variant:<9} {num(r.ms, '.4f'):>9} "
                f"{num(r.speedup_vs_eager, '.2f'):>7} {num(r.speedup_vs_compiled, '.2f'):>9} "
                f"{num(r.compile_s, '.1f'):>9} {num(r.rel_err, '.1e'):>8}")
        lines.append(line + (f"  FAILED {r.error}" if r.error else ""))
    return "\n".join(lines)


def _triton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m ops.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows (and the device, versions) to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the 'compiled' variant (CPU smoke tests use aot_eager)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU (GPU: do_bench decides)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    fused = device.type == "cuda" and ops.fused_available()
    variants = ["eager", "compiled"] + (["fused"] if fused else [])
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    rows: list[Row] = []
    for case in cases:
        print(f"[ops.bench] {case.op} {case.label} {case.dtype}: {', '.join(variants)}", file=sys.stderr, flush=True)
        rows.extend(run_case(case, device, variants, args.compile_backend, args.reps))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "compile_backend": args.compile_backend,
        "fused_available": fused,
        "rows": [asdict(r) for r in rows],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\nops.bench on {report['device']} (torch {torch.__version__}); forward+backward, median ms")
    print(format_table(rows))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
