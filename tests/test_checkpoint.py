"""Checkpoints are atomic: an interrupted save leaves the last good checkpoint and the pointer intact."""


import pytest
import torch

from prodistill.training import checkpoint as ck


def _save(tmp_path, step, value, keep=3):
    return ck.save_checkpoint(tmp_path, step, {"student": {"w": torch.full((2,), float(value))}},
                              {"step": step}, keep=keep)


def test_round_trip_and_pruning(tmp_path):
    for step in range(1, 5):
        _save(tmp_path, step, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000004"]
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "ckpt-0000004" and ck.read_meta(latest)["step"] == 4
    assert ck.load_weights(latest)["student"]["w"].tolist() == [4.0, 4.0]
    assert ck.load_state(latest) == {"step": 4}
    from prodistill.atomic import umask_mode

    assert (latest / "student.safetensors").stat().st_mode & 0o777 == umask_mode(0o666)
    assert latest.stat().st_mode & 0o777 == umask_mode(0o777)


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 2.0)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "ckpt-0000001"
    assert ck.load_weights(latest)["student"]["w"].tolist() == [1.0, 1.0]
    assert not list(tmp_path.glob(".tmp-ckpt-*")) and not (tmp_path / "ckpt-0000002").exists()


def test_half_written_folder_without_meta_is_ignored(tmp_path):
    _save(tmp_path, 1, 1.0)
    (tmp_path / "ckpt-0000009").mkdir()  # e.g. copied by hand, incomplete
    (tmp_path / ck.LATEST).unlink()
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-0000001"
