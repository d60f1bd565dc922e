"""`prodistill bench data` on the CPU: PyAV throughput and training consumption measured side by side."""

import json

import pytest
from click.testing import CliRunner

from prodistill.cli import main


def test_bench_data_reports_rates_and_ratio(tmp_path):
    out = tmp_path / "bd.json"
    result = CliRunner().invoke(main, [
        "bench", "data", "--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--device", "cpu",
        "--batch-size", "2", "--batches", "2", "--train-steps", "1", "--workers", "0", "--json", str(out)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["pyav_clips_per_s"] > 0 and r["train_sec_per_step"] > 0
    assert r["train_clips_per_s"] == pytest.approx(2 / r["train_sec_per_step"])
    assert r["pyav_over_consumption"] == pytest.approx(r["pyav_clips_per_s"] / r["train_clips_per_s"])
    assert "GPU" in r["dali_unavailable"] and "PyAV (CPU)" in result.output
