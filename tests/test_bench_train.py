"""`prodistill bench train` on the tiny preset, CPU: the harness end to end, and the plain yardstick doing the
same work as prodistill's step (counted FLOPs)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from prodistill.bench.train import format_train_table, parse_configs, run_train_bench


def test_bench_train_runs_every_cpu_config_and_counts_the_same_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PRODISTILL_COMPILE_BACKEND", "eager")
    cfg = tiny_config(tmp_path, stage="2", compile_cache=str(tmp_path / "cache"))
    configs = parse_configs("compile,eager,plain,eager-pixels", torch.device("cpu"))
    assert configs == ["plain", "eager-pixels", "eager", "compile"]  # canonical order, whatever was asked
    saved = []
    result = run_train_bench(cfg, torch.device("cpu"), configs, warmup=1, iters=1, explain=True,
                             echo=lambda *_: None, on_row=lambda r: saved.append(len(r["rows"])))
    rows = {r["config"]: r for r in result["rows"]}
    assert saved == [1, 2, 3, 4]
    assert all(r["sec_per_it"] > 0 and r["first_iter_s"] > 0 for r in rows.values())
    # the yardstick does prodistill's work: same FLOPs; encoding inside the step adds the encoders' FLOPs
    assert rows["plain"]["tflop_per_it"] == pytest.approx(rows["eager"]["tflop_per_it"], rel=1e-6)
    assert rows["eager-pixels"]["tflop_per_it"] > rows["eager"]["tflop_per_it"] > 0
    assert rows["compile"]["tflop_per_it"] == rows["eager"]["tflop_per_it"]
    assert rows["eager"]["speedup_vs_plain"] == pytest.approx(rows["plain"]["sec_per_it"] / rows["eager"]["sec_per_it"])
    assert "mfu" not in rows["eager"]  # no peak for a CPU
    assert result["explain"]["dynamo"]["graph_breaks"] == 0 and "profile" in result["explain"]
    table = format_train_table(result)
    assert "compile" in table and "plain" in table and "no bf16 peak" in table


def test_bench_train_refuses_unknown_and_gpu_only_configs_on_cpu():
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_configs("eager,fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="need --device cuda"):
        parse_configs("eager,compile+graphs", torch.device("cpu"))


def test_derive_takes_the_flop_count_of_plain_when_eager_did_not_run():
    from prodistill.bench.train import _derive

    result = {"peak_tflops": 1000.0, "rows": [
        {"config": "plain", "sec_per_it": 2.0, "tflop_per_it": 200.0},
        {"config": "compile+graphs", "sec_per_it": 1.0}]}
    _derive(result)
    fast = result["rows"][1]
    assert fast["tflop_per_it"] == 200.0 and fast["mfu"] == pytest.approx(0.2) and fast["speedup_vs_plain"] == 2.0
