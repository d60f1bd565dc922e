"""`prodistill bench sample` end to end on the tiny preset (CPU: torch eager and ONNX Runtime rows)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from prodistill.cli import main


def test_bench_sample_tiny_cpu(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", "sample", "--preset", "tiny", "--resolution", "32x32", "--frames", "4",
                                       "--teacher-steps", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {(r["path"], r["generation"]): r for r in data["rows"]}
    assert set(rows) == {("torch eager", "teacher 2-step CFG"), ("torch eager", "student 1 step"),
                         ("torch eager", "student TTS"), ("torch eager", "student 1 step, tiny decoder"),
                         ("onnxruntime", "student 1 step"), ("onnxruntime", "student TTS")}
    assert [rows[("torch eager", g)]["nfe"] for g in ("teacher 2-step CFG", "student 1 step", "student TTS")] == [4, 1, 2]
    for r in rows.values():
        assert r["encode_s"] > 0 and r["unet_s"] > 0 and r["decode_s"] > 0 and r["peak_mem_gb"] > 0
        assert abs(r["total_s"] - (r["encode_s"] + r["unet_s"] + r["decode_s"])) < 1e-4
    assert set(data["skipped"]) == {"torch.compile", "tensorrt"}
    assert data["config"] == {"preset": "tiny", "resolution": "32x32", "frames": 4, "dtype": "fp32", "device": "cpu",
                              "teacher_steps": 2, "teacher": None, "gpu": None}
    assert "onnxruntime    student 1 step" in result.output


def test_bad_json_or_tiny_decoder_is_refused_before_any_model(tmp_path, monkeypatch):
    """A --json that cannot be written and a --tiny-decoder folder without a decoder were found after the timings."""
    import pytest

    import prodistill.training.run

    monkeypatch.setattr(prodistill.training.run, "build_models", lambda *a, **k: pytest.fail("models were built"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    args = ["bench", "sample", "--preset", "tiny", "--resolution", "32x32", "--frames", "4", "--device", "cpu"]
    for extra, message in ((["--json", str(tmp_path / "file" / "b.json")], "is a file, not a folder"),
                           (["--tiny-decoder", str(tmp_path / "empty")], "holds no tiny decoder")):
        result = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "b.json"), *extra])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "b.json").exists()
