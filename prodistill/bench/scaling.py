"""`prodistill bench train --nproc N`: the training step on one process and on N, side by side in one run.

The command launches `torchrun --standalone --nproc-per-node K -m prodistill bench train ...` twice with its own
options: K = 1 (one GPU, no DDP: the single-GPU trainer a user would otherwise run, every configuration, as a
plain `bench train`), then K = N. Both launches run the same way (a fresh process per GPU, nothing left on GPU 0
by the launching command, OMP_NUM_THREADS=1 unless set, as torchrun itself sets for N > 1). Every one of the N
workers builds the same models, wraps the method's trainable networks in DDP exactly as `prodistill train` does
under torchrun (`prodistill.training.distributed`), draws its own synthetic batch and noise, and times the same
step; rank 0's per-iteration time includes waiting for the slowest rank in the gradient all-reduce. Then, per
configuration:

    samples/s on N = N × batch / (s/it on N),   scaling efficiency = samples/s on N / (N × samples/s on 1).

`plain` (the diffusers yardstick) has no DDP and is measured on one process only. On CPU the figures only show
that the harness works (the workers share the cores); the figure that counts is NCCL on N GPUs of one host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


class ScalingError(RuntimeError):
    """The multi-process half of the benchmark failed."""


def worker_argv(**options) -> list[str]:
    """`prodistill bench train` flags that reproduce `options` in the workers (None and False are left out)."""
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def launch_workers(nproc: int, argv: list[str], json_path: Path) -> dict:
    """Run `prodistill bench train argv` under torchrun on `nproc` processes; rank 0's result."""
    root = str(Path(__file__).resolve().parents[2])  # the workers import this very prodistill
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "prodistill", "bench", "train", *argv, "--json", str(json_path)]
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not json_path.is_file():
        raise ScalingError(f"the {nproc}-process run failed (torchrun exit status {rc}); its output is above")
    return json.loads(json_path.read_text())


def run_scaling_bench(nproc: int, argv: list[str], explain: bool = False, echo=print) -> dict:
    """Time the configurations of `argv` on 1 process, then on `nproc`; the 1-process result (rows as a plain
    `bench train` reports them) with the scaling table added."""
    with tempfile.TemporaryDirectory() as tmp:
        echo("1 process (torchrun) ...")
        single = launch_workers(1, argv + (["--explain"] if explain else []), Path(tmp) / "one.json")
        echo(f"{nproc} processes (torchrun, DDP) ...")
        multi = launch_workers(nproc, argv, Path(tmp) / "ranks.json")
    return merge(single, multi, nproc)


def merge(single: dict, multi: dict, nproc: int) -> dict:
    """`single` with a "scaling" table: per configuration measured both ways, s/it, samples/s and efficiency."""
    batch = single["batch_size"]
    ones = {r["config"]: r for r in single["rows"]}
    rows = []
    for r in multi["rows"]:
        one = ones.get(r["config"])
        if one is None:
            continue
        sps_1, sps_n = batch / one["sec_per_it"], nproc * batch / r["sec_per_it"]
        rows.append({"config": r["config"], "sec_per_it_1": one["sec_per_it"], "samples_per_s_1": sps_1,
                     "sec_per_it_n": r["sec_per_it"], "samples_per_s_n": sps_n,
                     "efficiency": sps_n / (nproc * sps_1), "peak_alloc_gb_n": r.get("peak_alloc_gb")})
    return {**single, "nproc": nproc, "world_size_n": multi["world_size"], "world_device": multi["device"],
            "scaling": rows}


def format_scaling_table(r: dict) -> str:
    n = r["nproc"]
    lines = [f"scaling: 1 process vs {n} (torchrun, DDP, batch {r['batch_size']} per process) on {r['world_device']}",
             f"{'config':24}{'s/it 1':>9}{'samples/s 1':>13}{f's/it {n}':>9}{f'samples/s {n}':>13}{'efficiency':>12}"]
    for row in r["scaling"]:
        lines.append(f"{row['config']:24}{row['sec_per_it_1']:9.3f}{row['samples_per_s_1']:13.3f}"
                     f"{row['sec_per_it_n']:9.3f}{row['samples_per_s_n']:13.3f}{row['efficiency']:11.1%}")
    if r["device"] == "cpu":
        lines.append("CPU: the processes share the cores, so these figures only show that the harness runs")
    return "\n".join(lines)


def run_worker(cfg, device: torch.device, configs: list[str], warmup: int, iters: int, explain: bool,
               json_path: Path) -> None:
    """One of the processes torchrun started: time `configs` (on N > 1 all but `plain`, with the method under
    DDP); rank 0 writes the result for the launching command."""
    from prodistill.bench.train import run_train_bench, write_train_json
    from prodistill.training import distributed

    dist = distributed.setup(device, cfg.dist_timeout, "ddp")
    try:
        names = [c for c in configs if c != "plain" or not dist.enabled]
        result = run_train_bench(cfg, dist.device, names, warmup, iters, explain,
                                 echo=print if dist.is_main else _quiet)
        if dist.is_main:
            write_train_json({**result, "world_size": dist.world_size}, json_path)
    finally:
        distributed.teardown(dist)


def _quiet(*_args) -> None:
    pass
