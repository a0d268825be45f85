"""Checkpoint directories: atomic commit, manifest check, keep-last-K, resume discovery, RNG states."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lmforge.runtime.train import checkpoint as ckpt


def write_checkpoint(root: Path, step: int, keep_last: int = 10) -> Path:
    tmp = ckpt.begin(root, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "shard.bin").write_bytes(b"x" * (10 + step))
    (tmp / "scheduler.pt").write_bytes(b"s")
    return ckpt.commit(root, step, {"step": step, "epoch": 0, "microStep": step}, keep_last)


def test_commit_renames_into_place_with_a_manifest(tmp_path: Path) -> None:
    final = write_checkpoint(tmp_path, 7)
    assert final == tmp_path / "step-00000007" and not ckpt.temp_dir(tmp_path, 7).exists()
    state, why = ckpt.check_complete(final)
    assert why == "" and state["step"] == 7
    assert state["files"] == {"model/shard.bin": 17, "scheduler.pt": 1}


def test_keep_last_and_stale_temp_dirs(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step, keep_last=2)
    ckpt.begin(tmp_path, 3)  # a kill mid-write left this behind
    ckpt.begin(tmp_path, 10)  # being written right now (newer than any committed one)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    ckpt.prune(tmp_path, keep_last=2)
    assert not ckpt.temp_dir(tmp_path, 3).exists() and ckpt.temp_dir(tmp_path, 10).exists()


def test_resume_skips_incomplete_and_corrupt_newest(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        write_checkpoint(tmp_path, step)
    (tmp_path / "step-00000012" / "model" / "shard.bin").write_bytes(b"trunc")  # corrupt: size differs
    broken = tmp_path / "step-00000016"
    broken.mkdir()  # incomplete: no trainer_state.json
    ckpt.begin(tmp_path, 20)  # temp dirs are never candidates
    logged: list[str] = []
    found = ckpt.find_resumable(tmp_path, log=logged.append)
    assert [f.step for f in found] == [8, 4]
    assert "step-00000016: no trainer_state.json" in logged[0]
    assert "step-00000012: model/shard.bin has 5 bytes, expected 22" in logged[1]
    (tmp_path / "step-00000008" / "trainer_state.json").write_text("{")
    assert [f.step for f in ckpt.find_resumable(tmp_path, log=logged.append)] == [4]


def test_rng_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(1)
    ckpt.save_rng(tmp_path, rank=3)
    expected = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    assert ckpt.load_rng(tmp_path, rank=3) and not ckpt.load_rng(tmp_path, rank=0)
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
