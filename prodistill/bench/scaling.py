"""`prodistill bench train --nproc N`: the training step on one GPU and on N, side by side in one run.

The command launches `torchrun --standalone --nproc-per-node N -m prodistill bench train ...` with its own options
(PyTorch's launcher; OMP_NUM_THREADS=1 unless set, as torchrun itself sets it). In that one job:
1. rank 0 alone times every configuration as a plain `bench train` would (no DDP: the single-GPU trainer a user
   would otherwise run) while the other ranks wait, their GPUs idle;
2. all N ranks time the configurations again (all but `plain`, which has no DDP) with the method's trainable
   networks under DDP exactly as `prodistill train` puts them under torchrun (`prodistill.training.distributed`),
   each rank with its own synthetic batch and noise. Rank 0's per-iteration time includes waiting for the slowest
   rank in the gradient all-reduce.

Then, per configuration: samples/s on N = N × batch / (s/it on N), and scaling efficiency = samples/s on N /
(N × samples/s on 1). On CPU the figures only show that the harness runs (the ranks share the cores); the figure
that counts is NCCL on N GPUs of one host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WAIT_S = 4 * 3600
"""Collective timeout inside the benchmark job: ranks 1..N-1 wait while rank 0 times (and compiles) alone."""


class ScalingError(RuntimeError):
    """The multi-process benchmark failed."""


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


def run_scaling_bench(nproc: int, argv: list[str], echo=print) -> dict:
    """Run `prodistill bench train argv` as an `nproc`-process torchrun job; the 1-GPU result (rows as a plain
    `bench train` reports them) with the scaling table added."""
    root = str(Path(__file__).resolve().parents[2])  # the workers import this very prodistill
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "prodistill", "bench", "train", *argv, "--json", str(path)]
        echo(f"torchrun: {nproc} processes ...")
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0 or not path.is_file():
            raise ScalingError(f"the {nproc}-process benchmark failed (torchrun exit status {rc}); its output is above")
        job = json.loads(path.read_text())
    return merge(job["single"], job["multi"], job["world_size"])


def run_worker(cfg, device: torch.device, configs: list[str], warmup: int, iters: int, explain: bool,
               json_path: Path) -> None:
    """One process of the job: rank 0 times `configs` alone, then every rank times them under DDP; rank 0 writes
    both results for the launching command."""
    from prodistill.bench.train import run_train_bench, write_train_json
    from prodistill.training import distributed

    dist = distributed.setup(device, WAIT_S, "ddp")
    echo = print if dist.is_main else _quiet
    try:
        single = None
        if dist.is_main:
            echo("1 process (rank 0 alone):")
            with distributed.solo():
                single = run_train_bench(cfg, dist.device, configs, warmup, iters, explain, echo=echo)
        dist.barrier()
        echo(f"{dist.world_size} processes (DDP):")
        multi = run_train_bench(cfg, dist.device, [c for c in configs if c != "plain"], warmup, iters, echo=echo)
        if dist.is_main:
            write_train_json({"single": single, "multi": multi, "world_size": dist.world_size}, json_path)
    finally:
        distributed.teardown(dist)


def merge(single: dict, multi: dict, nproc: int) -> dict:
    """`single` with a "scaling" table: per configuration measured both ways, s/it, samples/s and efficiency."""
    batch = single["batch_size"]
    ones = {r["config"]: r for r in single["rows"]}
    rows = []
    for r in multi["rows"]:
        one = ones[r["config"]]
        sps_1, sps_n = batch / one["sec_per_it"], nproc * batch / r["sec_per_it"]
        rows.append({"config": r["config"], "sec_per_it_1": one["sec_per_it"], "samples_per_s_1": sps_1,
                     "sec_per_it_n": r["sec_per_it"], "samples_per_s_n": sps_n,
                     "efficiency": sps_n / (nproc * sps_1), "peak_alloc_gb_n": r.get("peak_alloc_gb")})
    return {**single, "nproc": nproc, "scaling": rows}


def format_scaling_table(r: dict) -> str:
    n = r["nproc"]
    lines = [f"scaling: 1 process vs {n} (torchrun, DDP, batch {r['batch_size']} per process) on {r['device']}",
             f"{'config':24}{'s/it 1':>9}{'samples/s 1':>13}{f's/it {n}':>9}{f'samples/s {n}':>13}{'efficiency':>12}"]
    for row in r["scaling"]:
        lines.append(f"{row['config']:24}{row['sec_per_it_1']:9.3f}{row['samples_per_s_1']:13.3f}"
                     f"{row['sec_per_it_n']:9.3f}{row['samples_per_s_n']:13.3f}{row['efficiency']:11.1%}")
    if r["device"] == "cpu":
        lines.append("CPU: the processes share the cores, so these figures only show that the harness runs")
    return "\n".join(lines)


def _quiet(*_args) -> None:
    pass
