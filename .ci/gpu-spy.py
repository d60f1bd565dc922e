"""Summarise a py-spy recording (speedscope format) of a `prodistill bench train` or `prodistill train` launch:
the main thread's wall time split into phases by the functions its samples are in, when each phase ran, and the
functions each phase spent its own time in.

On the GPU machine (wheels staged with `bash .ci/gpu-prepare --spy`):
    bash .ci/gpu-run /tmp/site/bin/py-spy record --idle -r 100 -f speedscope -o $OUT/run.json -- \\
        python3 -m prodistill bench train --preset svd-xt --configs compile+graphs --compile-cache /tmp/cc
then here:  python3 .ci/gpu-spy.py run.json [TOP]
"""

import collections
import json
import sys

# (phase, a function whose frame puts a sample in it): the first match wins, so the narrower phases come first
PHASES = (("load compiled variants", "_load"), ("guard checks", "guard_check"),
          ("compile (dynamo/inductor)", "compile_job"), ("CUDA graph capture", "capture"),
          ("FLOP count", "count_tflop"), ("FLOP count", "count_eager_tflop"), ("build models", "build_models"),
          ("method + speed-ups", "_make_step"), ("method + speed-ups", "accelerate"), ("steps", "run_config"),
          ("steps", "fit"), ("imports", "_find_and_load"))


def main(path: str, top: int = 8) -> None:
    data = json.load(open(path))
    frames = data["shared"]["frames"]

    def label(i: int) -> str:
        f = frames[i]
        where = f.get("file", "").split("site-packages/")[-1]
        return f"{f['name']} ({where}:{f.get('line', '')})"

    main_thread = max(data["profiles"], key=lambda p: len(p["samples"]))  # weights are seconds
    spent, own = collections.Counter(), collections.defaultdict(collections.Counter)
    first, last, clock = {}, {}, 0.0
    for stack, seconds in zip(main_thread["samples"], main_thread["weights"]):
        names = [frames[i]["name"] for i in stack]
        phase = next((p for p, fn in PHASES if fn in names), "other")
        spent[phase] += seconds
        own[phase][label(stack[-1]) if stack else "(idle)"] += seconds
        first.setdefault(phase, clock)
        last[phase] = clock + seconds
        clock += seconds
    print(f"{main_thread['name']}: {clock:.1f} s sampled")
    for phase, seconds in spent.most_common():
        print(f"{phase}: {seconds:.2f} s (between {first[phase]:.1f} s and {last[phase]:.1f} s)")
        for name, s in own[phase].most_common(top):
            print(f"    {s:7.2f} s  {name[:140]}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
