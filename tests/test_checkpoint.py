"""Checkpoint writing, safe loading, rotation, resume discovery and RNG round trips (CPU, fast)."""

from __future__ import annotations

import logging
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ck  # noqa: E402
from config import config_from_yaml_text, default_config  # noqa: E402
from errors import UserError  # noqa: E402


def _state(epoch: int, step: int, **extra) -> dict:
    model = torch.nn.Linear(4, 3)
    state = {
        "model": model.state_dict(),
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3).state_dict(),
        "lr_scheduler": {},
        "scaler": {},
        "epoch": epoch,
        "step": step,
        "max_accuracy": 12.5,
    }
    state.update(extra)
    return state


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_save_loads_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pth"
    ck.save_checkpoint(str(path), _state(1, 10))
    assert _leftovers(path.parent) == []
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 1 and loaded["step"] == 10
    assert ck.load_checkpoint_file(str(path))["max_accuracy"] == 12.5


def test_crash_during_replace_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    ck.save_checkpoint(str(path), _state(1, 10))
    before = path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save_checkpoint(str(path), _state(2, 20))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert ck.load_checkpoint_file(str(path))["epoch"] == 1


def test_unsafe_state_is_rejected_at_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="numpy"):
        ck.save_checkpoint(str(tmp_path / "x.pth"), {"model": {}, "acc": np.float64(1.0)})
    assert list(tmp_path.iterdir()) == []


def test_keep_k_pruning_and_best_last(tmp_path: Path) -> None:
    for epoch in range(5):
        ck.save_epoch_checkpoint(str(tmp_path), epoch, _state(epoch, epoch * 10), keep=2, is_best=(epoch == 1))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pth", "ckpt_epoch_3.pth", "ckpt_epoch_4.pth", "last.pth"]
    assert ck.load_checkpoint_file(str(tmp_path / "best.pth"))["epoch"] == 1
    assert ck.load_checkpoint_file(str(tmp_path / "last.pth"))["epoch"] == 4


def test_keep_zero_keeps_all_and_epoch_save_removes_step_file(tmp_path: Path) -> None:
    ck.save_step_checkpoint(str(tmp_path), _state(0, 5))
    for epoch in range(4):
        ck.save_epoch_checkpoint(str(tmp_path), epoch, _state(epoch, epoch), keep=0, is_best=False)
    assert len(list(tmp_path.glob("ckpt_epoch_*.pth"))) == 4
    assert not (tmp_path / "ckpt_step.pth").exists()


def test_find_resume_orders_by_stored_epoch_and_step(tmp_path: Path) -> None:
    assert ck.find_resume_checkpoint(str(tmp_path / "missing")) is None
    assert ck.find_resume_checkpoint(str(tmp_path)) is None
    ck.save_epoch_checkpoint(str(tmp_path), 2, _state(2, 30), keep=0, is_best=False)
    # Mid-epoch point of epoch 3, written later: it is the newest.
    ck.save_step_checkpoint(str(tmp_path), _state(3, 35))
    assert ck.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_step.pth")
    # A newer mtime must not win over the stored (epoch, step).
    os.utime(tmp_path / "ckpt_epoch_2.pth", (4e9, 4e9))
    assert ck.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_step.pth")


def test_find_resume_reads_a_checkpoint_in_torchs_legacy_non_zip_format(tmp_path: Path) -> None:
    """torch.save(_use_new_zipfile_serialization=False) files cannot be memory-mapped: they are
    read instead, not skipped as unreadable."""
    torch.save(_state(1, 10), tmp_path / "last.pth", _use_new_zipfile_serialization=False)
    assert ck.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.pth")
    assert ck.load_checkpoint_file(str(tmp_path / "last.pth"))["step"] == 10


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_find_resume_skips_damaged_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    ck.save_epoch_checkpoint(str(tmp_path), 1, _state(1, 10), keep=0, is_best=False)
    ck.save_epoch_checkpoint(str(tmp_path), 2, _state(2, 20), keep=0, is_best=False)
    newest = tmp_path / "ckpt_epoch_2.pth"
    data = newest.read_bytes()
    os.unlink(tmp_path / "last.pth")  # shares epoch 2's bytes (hard link or copy)
    if damage == "cut":
        newest.write_bytes(data[: len(data) // 2])
    else:
        newest.write_bytes(b"\x00not a checkpoint" * 64)
    with caplog.at_level(logging.WARNING, logger="swin.checkpoint"):
        found = ck.find_resume_checkpoint(str(tmp_path))
    assert found == str(tmp_path / "ckpt_epoch_1.pth")
    assert any("ckpt_epoch_2.pth" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="ckpt_epoch_2.pth"):
        ck.load_checkpoint_file(str(newest))


class _Evil:
    """Unpickling this would create a marker file (stands in for os.system)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.ones(2)}, "x": _Evil(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load .*pickled Python objects"):
        ck.load_checkpoint_file(str(path))
    assert not marker.exists()
    # The resume scan must skip it the same way, without running it.
    os.replace(path, tmp_path / "last.pth")
    assert ck.find_resume_checkpoint(str(tmp_path)) is None
    assert not marker.exists()


def test_missing_and_empty_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint_file(str(tmp_path / "nope.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pth"):
        ck.load_checkpoint_file(str(tmp_path / "empty.pth"))


def test_rng_capture_restore_reproduces_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the numpy state
    state = ck.capture_rng_state()
    first = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())

    # Through a weights-only save/load, as on resume.
    ck.save_checkpoint(str(tmp_path / "rng.pth"), {"model": {}, "rng": state})
    loaded = ck.load_checkpoint_file(str(tmp_path / "rng.pth"))["rng"]
    torch.rand(7), np.random.rand(3), random.random()  # move every generator on
    ck.restore_rng_state(loaded)
    second = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert first[3] == second[3]


def test_full_state_with_config_round_trips_weights_only(tmp_path: Path) -> None:
    cfg = default_config()
    cfg.defrost()
    cfg.TRAIN.EPOCHS = 7
    cfg.freeze()
    state = _state(
        3,
        99,
        config=ck.config_yaml(cfg),
        sampler={"epoch": 3, "start_index": 256},
        rng=ck.capture_rng_state(),
        class_names=["cat", "dog"],
    )
    path = tmp_path / "full.pth"
    ck.save_checkpoint(str(path), state)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["class_names"] == ["cat", "dog"]
    assert loaded["sampler"] == {"epoch": 3, "start_index": 256}
    assert config_from_yaml_text(loaded["config"]).TRAIN.EPOCHS == 7
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])


def test_safetensors_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"head.weight": torch.randn(3, 4), "head.bias": torch.zeros(3)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    loaded = ck.load_checkpoint_file(str(path))
    assert set(loaded) == {"model"}
    assert torch.equal(loaded["model"]["head.weight"], tensors["head.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.safetensors"):
        ck.load_checkpoint_file(str(tmp_path / "bad.safetensors"))


class _Recorder:
    """Stands in for the scheduler and the scaler: records what it was given."""

    def __init__(self) -> None:
        self.loaded = None

    def load_state_dict(self, state) -> None:
        self.loaded = state

    def is_enabled(self) -> bool:
        return True


def _trainer(batch_in_epoch: int, global_batch: int | None, **extra) -> dict:
    sampler = {"epoch": 3, "batch_in_epoch": batch_in_epoch}
    if global_batch is not None:
        sampler["global_batch"] = global_batch
    return {"lr_scheduler": {"t": 1}, "scaler": {"scale": 8.0}, "epoch": 3, "step": 50, "sampler": sampler, **extra}


@pytest.mark.parametrize(
    "saved_global,this_global,expected_batch",
    [(64, 64, 3), (64, 32, 6), (64, 128, 1), (None, 32, 3)],
    ids=["same", "half-the-ranks", "twice-the-ranks", "older-checkpoint"],
)
def test_a_mid_epoch_position_is_converted_to_this_runs_batches_with_a_warning(
    saved_global, this_global, expected_batch, caplog
) -> None:
    """The samplers' positions are global: 3 batches of 64 images are 6 of 32 (on half the ranks);
    on twice the ranks training goes on at the batch holding the next image, 192 // 128 = 1."""
    from distributed import DistEnv
    from engine import TrainState

    state, scheduler, scaler = TrainState(), _Recorder(), _Recorder()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    with caplog.at_level(logging.WARNING, logger="swin.checkpoint"):
        ck.restore_trainer_state(_trainer(3, saved_global), state, scheduler, scaler, env, this_global)
    assert (state.epoch, state.batch_in_epoch, state.step) == (3, expected_batch, 50)
    assert scheduler.loaded == {"t": 1} and scaler.loaded == {"scale": 8.0}
    changed = saved_global is not None and saved_global != this_global
    assert ("images per optimizer step" in caplog.text) == changed


def test_the_skipped_step_counts_come_back_and_an_epoch_end_checkpoint_resumes_at_the_next_epoch() -> None:
    from distributed import DistEnv
    from engine import TrainState

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    state = TrainState()
    trainer = _trainer(0, 64, nonfinite_in_row=2, nonfinite_total=7, max_accuracy=81.5)
    ck.restore_trainer_state(trainer, state, _Recorder(), _Recorder(), env, 64)
    assert (state.epoch, state.batch_in_epoch) == (4, 0)
    assert (state.nonfinite_in_row, state.nonfinite_total, state.max_accuracy) == (2, 7, 81.5)
    older = TrainState()  # a checkpoint written before the counts were saved
    ck.restore_trainer_state(_trainer(0, 64), older, _Recorder(), _Recorder(), env, 64)
    assert (older.nonfinite_in_row, older.nonfinite_total) == (0, 0)
