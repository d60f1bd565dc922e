"""Time one SVD-XT UNet forward as the teacher's solve runs it (bf16, 512², 14 frames, batch 1 as the split CFG calls
it, the exact rewrite, random weights, no grad), eagerly and with prodistill's regions compiled, each replayed as a
CUDA graph (median of 20 replays, `prodistill.bench.profile.time_ms`), plus the compiled forward's kernel time by
family (one ungraphed call under the profiler). For trying what could make the teacher's forward faster — the
step's largest cost (README, Speed, run S) — without a whole `bench train`:

    python3 .ci/gpu-unet-forward.py [--layout nchw|cl|cl3d] [--workers N] [--no-prewarm] [--json FILE] [--tiny]

`--layout cl` makes the Conv2d weights channels-last (as `--channels-last` does); `cl3d` also the temporal Conv3d
weights channels-last-3d. Inductor options come from $PRODISTILL_INDUCTOR_OPTIONS as for `bench train`, e.g.
`PRODISTILL_INDUCTOR_OPTIONS='{"max_autotune_gemm": true}'` (Triton GEMM templates, autotuned). Compiles into a
fresh cache folder each run, so the compile time printed is a cold one: ahead of time in `--workers` background
processes as a launch does (default 8), or just in time in this process with `--workers 0` (on session 19's H100
that did not finish within 110 s). With several workers their processes start and warm up before the model is
built, as on a launch's empty cache (`Precompiler.prewarm`); `--no-prewarm` starts them when the first variant is
met, as before session 20, for comparing the two on one machine. `--tiny` runs the tiny preset's UNet on the CPU
(wall time), to check the script here.

On the GPU machine: `bash .ci/gpu-run python3 .ci/gpu-unet-forward.py --json $OUT/fwd.json`.
"""

import argparse
import collections
import json
import os
import tempfile
import time

import torch
from diffusers import UNetSpatioTemporalConditionModel

from prodistill.accel.compile import REGION_MODULES, compile_regions, inductor_options, use_cache_dir
from prodistill.accel.layout import set_conv_layout
from prodistill.accel.precompile import Precompiler
from prodistill.accel.rewrites import apply_rewrites
from prodistill.bench.profile import family, is_kernel, time_ms
from prodistill.models.presets import get_preset


def set_layout(unet, layout: str) -> None:
    """`--channels-last`'s Conv2d weights (`prodistill.accel.layout`), and for `cl3d` the Conv3d weights too."""
    set_conv_layout([unet], layout in ("cl", "cl3d"))
    if layout == "cl3d":
        for m in unet.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)


def kernel_ms(device, fn) -> dict:
    if device.type != "cuda":
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    families = collections.Counter()
    for e in prof.events():
        if is_kernel(e):
            families[family(e.name)] += e.time_range.elapsed_us() / 1e3
    return {k: round(v, 2) for k, v in families.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=("nchw", "cl", "cl3d"), default="nchw")
    p.add_argument("--workers", type=int, default=8, help="ahead-of-time compile processes; 0: just in time")
    p.add_argument("--no-prewarm", action="store_true", help="start the workers at the first variant, not before")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    options = inductor_options()  # a bad $PRODISTILL_INDUCTOR_OPTIONS stops here, before any model is built
    cache = tempfile.mkdtemp(prefix="unet-forward-")
    use_cache_dir(cache)
    device = torch.device("cpu" if a.tiny else "cuda")
    compiler = Precompiler(cache, workers=a.workers) if a.workers else None
    if compiler is not None and not a.no_prewarm:
        compiler.prewarm(str(device), REGION_MODULES)  # what a first launch does before building its models
    torch.manual_seed(0)
    config = get_preset("tiny").unet if a.tiny else dict(num_frames=25)
    with device:  # initialised on the GPU; a few parameters made by legacy constructors stay on the CPU, hence `.to`
        unet = UNetSpatioTemporalConditionModel(**config)
    unet = unet.to(device, torch.bfloat16).eval().requires_grad_(False)
    apply_rewrites([unet])
    set_layout(unet, a.layout)
    side = 8 if a.tiny else 64
    x = torch.randn(1, 14, unet.config.in_channels, side, side, device=device, dtype=torch.bfloat16)
    t = torch.full((1,), 0.5, device=device)
    c = torch.randn(1, 1, unet.config.cross_attention_dim, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([[6.0, 127.0, 0.02]], device=device)

    def forward():
        return unet(x, t, c, ids, return_dict=False)[0]

    with torch.no_grad():
        want = forward().float()
        eager_ms = time_ms(device, forward, 20, 1)
        print(f"eager {eager_ms:.2f} ms; compiling", flush=True)  # kept if a slow compile is cut off
        start = time.perf_counter()
        if compiler is not None:
            compile_regions([unet], wrap=compiler.wrap)
            forward()  # hands every variant to the workers (its regions run eagerly meanwhile)
            compiler.flush()
            aot = compiler.stats
        else:
            aot = {}
            compile_regions([unet])
        got = forward().float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        compiled_ms = time_ms(device, forward, 20, 2)
        families = kernel_ms(device, forward)
    out = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               layout=a.layout, prewarm=bool(compiler and not a.no_prewarm), inductor_options=options,
               eager_ms=round(eager_ms, 2), compile_s=round(compile_s, 1), aot=aot, compiled_ms=round(compiled_ms, 2),
               relative_difference=float((got - want).norm() / want.norm()), kernel_ms_by_family=families)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
