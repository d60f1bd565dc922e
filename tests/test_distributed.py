"""Many processes (issue 13) on the CPU: 2 ranks, gloo, the tiny preset.

One `torch.multiprocessing.spawn` job (module fixture) does the in-process checks and the reference run
(`distributed_helpers.spawn_checks`); one torchrun job kills a rank and restarts; `bench train --nproc 2` runs
end to end. Process start-up dominates (each worker imports torch and diffusers), so the jobs are few and each
one checks several things.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config
from distributed_helpers import spawn_checks, toy_trainer
from prodistill.config import build_config
from prodistill.training.checkpoint import latest_checkpoint, load_state, load_weights
from prodistill.training.logger import read_metrics
from prodistill.training.trainer import format_progress

REPO = Path(__file__).resolve().parents[1]
RUN = dict(method="lcm", preset="tiny", resolution="32x32", frames=4, max_steps=4, device="cpu", lora_rank=2,
           log_every=1, ckpt_every=2, sample_every=0, solver_steps=2, num_timesteps=10, warmup_steps=0,
           dist_timeout=180)
"""The 2-rank LCM run: 4 steps of one clip per rank, so the ranks' shares (4 of the 8 built-in clips each) are
read whole; checkpoints at steps 2 and 4."""


def cli_args(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def free_ports(n: int) -> tuple[int, ...]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """(rank 0's results, rank 1's results, the reference run's folder)."""
    out = tmp_path_factory.mktemp("dist")
    toy_cfg = tiny_config(out, grad_accum=2, max_steps=3, lr=0.05, grad_clip=0.05, keep_ckpts=3)
    run_cfg = build_config({**RUN, "out": str(out / "reference")})
    torch.multiprocessing.spawn(spawn_checks, args=(2, free_ports(2), str(out), toy_cfg, run_cfg), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)] + [out / "reference"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_of_batch_one_equal_one_rank_of_the_whole_batch(spawned, parallel):
    """3 steps, 2 micro-batches of 1 sample per rank (gradient sync skipped for the first), gradient clipping
    active, an EMA target inside the loss, a critic updated twice per step (each update synchronised): parameters,
    EMA and critic equal a 1-rank run of batch 4 on the same samples, and are identical on both ranks."""
    r0, r1, _ = spawned
    assert r0[f"{parallel}_sharded"] == (parallel == "fsdp")
    assert r0[parallel].keys() == r0["reference"].keys()
    assert {k.split("/")[0] for k in r0[parallel]} == {"student", "ema", "critic"}
    for key, ref in r0["reference"].items():
        assert torch.allclose(r0[parallel][key], ref, atol=1e-6, rtol=1e-5), key
        assert torch.equal(r0[parallel][key], r1[parallel][key]), key


def test_fsdp_checkpoint_resumes_exactly_from_dcp_optimizer_state(spawned):
    r0, r1, _ = spawned
    assert r0["fsdp_ckpt_has_optim"] and r0["fsdp_latest"].endswith("ckpt-0000003")
    for key, value in r0["fsdp"].items():
        assert torch.equal(r0["fsdp_resumed"][key], value), key
        assert torch.equal(r1["fsdp_resumed"][key], value), key


def test_ranks_draw_disjoint_data_and_noise_and_only_rank_zero_writes(spawned):
    r0, r1, run = spawned
    seen0, seen1 = r0["run"]["seen"], r1["run"]["seen"]
    assert len(seen0) == len(seen1) == 4
    assert not set(seen0) & set(seen1) and len(set(seen0) | set(seen1)) == 8  # the 8 built-in clips, once each
    assert r0["run"]["writes"] == {"checkpoint": 2, "metrics": 4, "preview": 1}
    assert r1["run"]["writes"] == {"checkpoint": 0, "metrics": 0, "preview": 0}
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    state = load_state(latest_checkpoint(run / "stage2"))
    assert state["world_size"] == 2 and [r["loader"]["position"] for r in state["ranks"]] == [4, 4]
    assert not torch.equal(state["ranks"][0]["generator"], state["ranks"][1]["generator"])


def test_torchrun_restarts_after_a_killed_rank_and_resumes_exactly(spawned, tmp_path):
    """rank 1 is SIGKILLed before step 3; torchrun stops rank 0, restarts both (--max-restarts 1), they resume
    from the step-2 checkpoint and end where the uninterrupted reference run ended, bit for bit."""
    reference = spawned[2]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PRODISTILL_TEST_KILL_STEP": "3", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(REPO / "tests" / "distributed_helpers.py"), "train",
           *cli_args({**RUN, "out": run})]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in output  # torchrun saw the SIGKILL
    assert "torchrun restart 1: resuming" in output
    final = latest_checkpoint(run / "stage2")
    assert final.name == "ckpt-0000004"
    got, want = load_weights(final), load_weights(reference / "stage2" / "ckpt-0000004")
    for group in ("student", "ema"):
        for key, value in want[group].items():
            assert torch.equal(got[group][key], value), (group, key)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    # not a terminal: plain progress lines, no redrawn bar
    assert "stage 2 step 4/4 | " in output and "s/step | ETA" in output and "\r" not in output
    print(f"restart job: {time.monotonic() - start:.0f} s")


def test_two_rank_checkpoint_resumes_on_one_rank(spawned, tmp_path, caplog):
    """The data position is rescaled (4 clips of rank 0 and 4 of rank 1 = 8 of a 1-rank epoch of 8, so step 5
    starts epoch 1) and the random streams are re-derived."""
    from prodistill.training.run import run_training

    run = tmp_path / "run"
    shutil.copytree(spawned[2], run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the 2-rank run had (torchrun's default): OpenMP spinning slows a shared CPU
    try:
        with caplog.at_level(logging.INFO, logger="prodistill"):
            run_training(build_config({**RUN, "out": str(run), "resume": True, "max_steps": 5}))
    finally:
        torch.set_num_threads(threads)
    assert "resuming 2-rank checkpoint" in caplog.text
    state = load_state(latest_checkpoint(run / "stage2"))
    assert state["step"] == 5 and state["world_size"] == 1 and "ranks" not in state
    assert (state["loader"]["epoch"], state["loader"]["position"]) == (1, 1)


def test_bench_train_nproc_reports_samples_per_second_and_scaling(tmp_path):
    from prodistill.cli import main

    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "train", "--preset", "tiny", "--resolution", "32x32", "--frames", "4",
                                       "--method", "lcm", "--configs", "eager", "--iters", "1", "--warmup", "1",
                                       "--device", "cpu", "--nproc", "2", "--json", str(path)])
    assert result.exit_code == 0, result.output
    r = json.loads(path.read_text())
    assert r["nproc"] == 2 and [row["config"] for row in r["rows"]] == ["eager"]
    (row,) = r["scaling"]
    assert row["config"] == "eager" and row["sec_per_it_1"] == r["rows"][0]["sec_per_it"]
    assert row["samples_per_s_n"] == pytest.approx(2 / row["sec_per_it_n"])
    assert row["efficiency"] == pytest.approx(row["samples_per_s_n"] / (2 * row["samples_per_s_1"]))
    assert "scaling: 1 process vs 2" in result.output and "efficiency" in result.output


def test_progress_is_one_plain_line_per_log_interval_off_a_terminal(tmp_path, caplog, monkeypatch):
    assert format_progress(2, 40, 200, 0.5, {"loss/distance": 0.01234, "loss/d": 1.98, "lr/generator": 1e-5,
                                             "d/logits_real": -0.1}) == \
        "stage 2 step 40/200 | 0.500 s/step | ETA 0:01:20 | distance=0.01234 d=1.98 d/logits_real=-0.1"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    trainer, _ = toy_trainer(tiny_config(tmp_path, max_steps=4, log_every=2, ckpt_every=4), tmp_path, 4)
    with caplog.at_level(logging.INFO, logger="prodistill"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if " s/step | ETA " in r.getMessage()]
    assert [line.split(" | ")[0] for line in lines] == ["stage 2 step 2/4", "stage 2 step 4/4"]
    assert all("toy=" in line for line in lines)
