"""Where the time of one training step goes (`bench train --explain`): GPU time per phase of the step, per kernel
family, and the share of the step's wall time the GPU is busy at all.

The phases are profiler ranges put around the method's callables for the profiled step only (the methods know
nothing of them): the teacher's m-step solve, the student's forward, the EMA target's forward and the
discriminator's forwards; what is left (backward passes, optimiser, EMA update, losses) is `rest`. A GPU busy
well under 100 % means the step waits on the CPU (Python, launches, a synchronisation); a phase's share says which
network to make faster first. Given the phases' FLOPs (counted on an eager step of the same iteration), each phase's
achieved TFLOP/s and its share of the device's bf16 peak follow (`add_phase_rates`).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import re
import statistics
import time

import torch

PHASES = (("teacher solve", "teacher_solve"), ("student forward", "student_d"), ("EMA target", "ema_d"))
"""(phase name, the method attribute called for it)."""
PREFIX = "phase: "

KERNEL_FAMILIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|efficient", re.I)),
    ("convolution", re.compile(r"conv|implicit|winograd|wgrad|dgrad|nchw|nhwc|cudnn", re.I)),
    ("GEMM", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|splitk", re.I)),
    ("memcpy/memset", re.compile(r"memcpy|memset", re.I)),
    ("inductor fused", re.compile(r"^triton_", re.I)),
    ("other", re.compile(r"")),
)
"""Kernel families by name, first match wins (cuDNN's conv kernels can be GEMM-named, so convolution first)."""
NOT_KERNELS = re.compile(r"^(## |Command Buffer Full|Activity Buffer|Overhead)")
"""GPU-side profiler events that are no kernel: inductor's `## Call CompiledFxGraph ##` annotations (their GPU
side spans the region's kernels, so counting it counts them twice) and CUPTI's own overhead records."""


def is_kernel(event) -> bool:
    """A kernel, memcpy or memset on the GPU (not a user annotation, a phase range or a profiler record)."""
    return (event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(PREFIX) and not NOT_KERNELS.search(event.name))


class _TotalsOnly:
    """Stands in for `FlopCounterMode`'s module tracker, so that the counter keeps totals only: the tracker's
    backward hooks fail inside `torch.autograd.grad` (MCM's gradient penalty differentiates the discriminator inside
    its loss), and nothing here reads per-module counts."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def flop_counter():
    """A `torch.utils.flop_counter.FlopCounterMode` counting the total FLOPs of what runs inside it."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()
    return counter


def _ranged(name: str, fn, flops: dict[str, float] | None):
    def call(*args, **kwargs):
        with torch.profiler.record_function(PREFIX + name):
            if flops is None:
                return fn(*args, **kwargs)
            with flop_counter() as counter:
                out = fn(*args, **kwargs)
            flops[name] = flops.get(name, 0.0) + counter.get_total_flops() / 1e12
            return out

    return call


@contextlib.contextmanager
def phase_ranges(method, flops: dict[str, float] | None = None):
    """Inside the block the method's teacher solve, student, EMA target and discriminator run in named profiler
    ranges, and, given `flops`, add the TFLOP they count (`FlopCounterMode`: eager code only — a CUDA-graph
    replay or a compiled region hides its ops) to it by phase; everything is put back on exit."""
    patched: list[tuple[object, str, object, bool]] = []
    targets = [(method, attr, name) for name, attr in PHASES if getattr(method, attr, None) is not None]
    disc = getattr(method, "disc", None)
    if hasattr(method, "disc_logits"):  # the call `prodistill.accel` may graph (then disc.forward never runs)
        targets.append((method, "disc_logits", "discriminator forward"))
    elif isinstance(disc, torch.nn.Module):
        targets.append((disc, "forward", "discriminator forward"))
    try:
        for obj, attr, name in targets:
            had = attr in vars(obj)
            old = getattr(obj, attr)
            patched.append((obj, attr, vars(obj).get(attr), had))
            setattr(obj, attr, _ranged(name, old, flops))
        yield
    finally:
        for obj, attr, old, had in reversed(patched):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)


def family(kernel_name: str) -> str:
    return next(name for name, pattern in KERNEL_FAMILIES if pattern.search(kernel_name))


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown(prof, wall_s: float) -> dict:
    """From a profiler run of one step that took `wall_s`: GPU milliseconds per phase (the kernels that start
    inside the phase's GPU-side range; `rest` the others), per kernel family, the kernel count, and the GPU-busy
    share of the wall time."""
    events = prof.events()
    kernels = [e for e in events if is_kernel(e)]
    busy_ms = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3
    total_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    phases: dict[str, float] = {}
    ranges = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith(PREFIX)]
    for r in ranges:  # the GPU side of a phase's range spans its kernels, CUDA-graph replays included
        name = r.name.removeprefix(PREFIX)
        inside = sum(k.time_range.elapsed_us() for k in kernels
                     if r.time_range.start <= k.time_range.start < r.time_range.end)
        phases[name] = phases.get(name, 0.0) + inside / 1e3
    phases["rest"] = max(0.0, total_ms - sum(phases.values()))
    families: dict[str, float] = {}
    for e in kernels:
        f = family(e.name)
        families[f] = families.get(f, 0.0) + e.time_range.elapsed_us() / 1e3
    return {"wall_ms": wall_s * 1e3, "gpu_busy_ms": busy_ms, "gpu_busy_share": busy_ms / (wall_s * 1e3),
            "kernel_ms": total_ms, "kernels": len(kernels),
            "phases_ms": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
            "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1]))}


IDLE_GAP_US = 20.0
"""GPU idle gaps shorter than this are launch latency between queued kernels; longer ones mean the GPU waited for
the CPU (`idle_gaps`)."""


def _op_name(name: str) -> str:
    """A CPU event's name with per-graph cache keys (inductor's `## Call CompiledFxGraph <key> ##`) and numbers
    dropped, so that calls of one kind group together."""
    return re.sub(r"\s+", " ", re.sub(r"\b([0-9a-z]{16,}|\d+|None)\b", "", name)).strip()


def _overlap_us(a: float, b: float, e) -> float:
    return max(0.0, min(b, e.time_range.end) - max(a, e.time_range.start))


def idle_gaps(prof, min_us: float = IDLE_GAP_US, top: int = 8) -> dict:
    """When, in a profiled step, the GPU had no kernel running, and what the training thread was doing meanwhile.

    The window runs from the training thread's first profiled CPU event to the last kernel's (or CPU event's) end;
    the GPU's idle time in it is split into gaps of at least `min_us` — each attributed, by overlap, to the outermost
    CPU op or range the training thread was inside (an op under a phase range counts as outermost; `Python
    (between ops)` where it ran none) and to the phase it was in (`outside phases`) — and the rest, the short gaps
    between queued kernels. The training thread is the one that ran the phase ranges (else the busiest)."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if is_kernel(e))
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.time_range is not None]
    threads = [e.thread for e in cpu if e.name.startswith(PREFIX)] or [e.thread for e in cpu]
    if not threads:
        return {}
    main = max(set(threads), key=threads.count)
    cpu = [e for e in cpu if e.thread == main]
    phases = [e for e in cpu if e.name.startswith(PREFIX)]

    def outermost(e) -> bool:
        parent = e.cpu_parent
        while parent is not None and parent.name.startswith(PREFIX):
            parent = parent.cpu_parent
        return parent is None and not e.name.startswith(PREFIX)

    ops = sorted((e for e in cpu if outermost(e)), key=lambda e: e.time_range.start)  # one thread's: disjoint
    op_ends = [e.time_range.end for e in ops]
    start = min(e.time_range.start for e in cpu)
    end = max([e.time_range.end for e in cpu] + [k[1] for k in kernels])
    gaps, cursor, previous = [], start, "(the step's start)"
    for a, b, name in [*kernels, (end, end, "")]:
        if a > cursor:
            gaps.append((cursor, a, previous))
        if b > cursor:
            cursor, previous = b, name
    idle_us = sum(b - a for a, b, _ in gaps)
    long = [g for g in gaps if g[1] - g[0] >= min_us]
    by_op: dict[str, float] = {}
    by_phase: dict[str, float] = {}
    listed = []
    for a, b, after in long:
        during = itertools.takewhile(lambda e: e.time_range.start < b,
                                     itertools.islice(ops, bisect.bisect_right(op_ends, a), None))
        inside = {"Python (between ops)": b - a}
        for e in during:
            us = _overlap_us(a, b, e)
            inside[_op_name(e.name)] = inside.get(_op_name(e.name), 0.0) + us
            inside["Python (between ops)"] -= us
        phase = {"outside phases": b - a}
        for e in phases:
            us = _overlap_us(a, b, e)
            phase[e.name.removeprefix(PREFIX)] = phase.get(e.name.removeprefix(PREFIX), 0.0) + us
            phase["outside phases"] -= us
        for totals, part in ((by_op, inside), (by_phase, phase)):
            for name, us in part.items():
                if us > 1e-9:
                    totals[name] = totals.get(name, 0.0) + us / 1e3
        listed.append({"at_ms": (a - start) / 1e3, "ms": (b - a) / 1e3, "after_kernel": after,
                       "cpu": max(inside, key=inside.get)})
    long_ms = sum(b - a for a, b, _ in long) / 1e3
    return {"window_ms": (end - start) / 1e3, "idle_ms": idle_us / 1e3, "gaps": len(long), "gaps_ms": long_ms,
            "short_gaps_ms": idle_us / 1e3 - long_ms, "min_gap_us": min_us,
            "by_cpu_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_phase_ms": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
            "longest": sorted(listed, key=lambda g: -g["ms"])[:top]}


def format_idle(g: dict, ops: int = 6) -> str:
    if not g:
        return ""
    lines = [f"GPU idle {g['idle_ms']:.1f} ms of the profiled {g['window_ms']:.1f} ms: {g['gaps_ms']:.1f} ms in "
             f"{g['gaps']} gaps of ≥ {g['min_gap_us']:.0f} µs, {g['short_gaps_ms']:.1f} ms between queued kernels",
             "  during the gaps the training thread ran: " + ", ".join(
                 f"{k} {v:.1f} ms" for k, v in list(g["by_cpu_op_ms"].items())[:ops]),
             "  by phase: " + ", ".join(f"{k} {v:.1f} ms" for k, v in g["by_phase_ms"].items())]
    lines += [f"  {x['ms']:.2f} ms at {x['at_ms']:.1f} ms, after {x['after_kernel'][:60]}, CPU in {x['cpu'][:60]}"
              for x in g["longest"]]
    return "\n".join(lines)


def phase_cpu_ms(prof) -> dict[str, float]:
    """CPU milliseconds spent inside each phase's range (Python, dispatch, launches): a phase whose CPU time
    exceeds its GPU time keeps the GPU waiting unless a CUDA graph replays it."""
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(PREFIX):
            name = e.name.removeprefix(PREFIX)
            out[name] = out.get(name, 0.0) + e.time_range.elapsed_us() / 1e3
    return out


def add_phase_rates(b: dict, phase_tflop: dict[str, float], peak_tflops: float | None) -> dict:
    """Each phase's TFLOP (counted on an eager step, `phase_ranges(method, flops)`; `rest` = the step's total
    minus the phases'), its achieved TFLOP/s over its GPU milliseconds, and that as a share of `peak_tflops`."""
    rates = {}
    for name, tflop in phase_tflop.items():
        ms = b["phases_ms"].get(name)
        if ms:
            rates[name] = {"tflop": tflop, "tflops": tflop / (ms / 1e3),
                           "mfu": tflop / (ms / 1e3) / peak_tflops if peak_tflops else None}
    b["phase_rates"] = rates
    return b


def format_breakdown(b: dict) -> str:
    lines = [f"step wall {b['wall_ms']:.1f} ms, GPU busy {b['gpu_busy_ms']:.1f} ms ({100 * b['gpu_busy_share']:.0f} %), "
             f"{b['kernels']} kernels, {b['kernel_ms']:.1f} ms of kernel time"]
    for title, key in (("by phase", "phases_ms"), ("by kernel family", "families_ms")):
        total = sum(b[key].values()) or 1.0
        lines.append(f"  {title}: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f} %)" for k, v in b[key].items()))
    if b.get("phase_cpu_ms"):
        lines.append("  CPU time inside: " + ", ".join(f"{k} {v:.1f} ms" for k, v in b["phase_cpu_ms"].items()))
    if b.get("phase_rates"):
        lines.append("  achieved: " + ", ".join(
            f"{k} {r['tflop']:.1f} TFLOP at {r['tflops']:.0f} TFLOP/s"
            + (f" ({100 * r['mfu']:.0f} % of peak)" if r["mfu"] is not None else "") for k, r in b["phase_rates"].items()))
    return "\n".join(lines)


def time_ms(device: torch.device, fn, reps: int, warmup: int, calls: int = 1) -> float:
    """Median milliseconds of `fn()` over `reps` after `warmup` calls. On a GPU: GPU time from replays of a CUDA graph
    of `calls` calls of `fn` (no launch or Python overhead: what a graphed or queued-ahead step pays), per call; per
    call with CUDA events where `fn` cannot be captured. The wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        try:
            return _graph_ms(fn, reps, calls)
        except Exception:  # not capturable: fall back to per-call timing (overhead included)
            torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph_ms(fn, reps: int, calls: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture-time allocations settle on a side stream first, as torch advises
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)
