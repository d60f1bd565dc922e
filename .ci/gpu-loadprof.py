"""Time loading every ahead-of-time region variant (`*.aot`) under a folder in a fresh process, as a warm launch
loads them (after importing what a training process has imported by then); with `profile`, under cProfile,
printing the top functions by cumulative and own time.

    python3 .ci/gpu-loadprof.py FOLDER [profile]

On the GPU machine, after `bench train ... --compile-cache /tmp/cc` has filled the cache:
`bash .ci/gpu-run python3 .ci/gpu-loadprof.py /tmp/cc/aot profile`.
"""

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

from prodistill.accel.precompile import _load


def main(folder: str, mode: str = "time") -> None:
    start = time.perf_counter()
    import peft  # noqa: F401  what a training process has imported before its first load: not counted as loading
    import torch._inductor.compile_fx  # noqa: F401
    import diffusers.models.unets.unet_spatio_temporal_condition  # noqa: F401  (the UNet's blocks)
    import prodistill.training.run  # noqa: F401  (the rest of the step)

    print(f"imports first: {time.perf_counter() - start:.2f} s", flush=True)
    files = sorted(Path(folder).rglob("*.aot"))
    print(f"{len(files)} files under {folder}, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB", flush=True)
    prof = cProfile.Profile() if mode == "profile" else None
    start, loaded = time.perf_counter(), 0
    if prof:
        prof.enable()
    for f in files:
        try:
            _load(str(f))
            loaded += 1
        except Exception as e:
            print("failed:", f.name, type(e).__name__, str(e)[:120])
    if prof:
        prof.disable()
    print(f"{loaded} loaded in {time.perf_counter() - start:.2f} s ({mode})", flush=True)
    if prof:
        for key, count in (("cumulative", 40), ("tottime", 20)):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(count)
            print(out.getvalue())


if __name__ == "__main__":
    main(*sys.argv[1:3])
