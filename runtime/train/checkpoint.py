"""Checkpoint directories: atomic writes, a manifest, keep-last-K and resume discovery.

    <checkpoint.dir>/
      step-00000200/            complete: renamed into place only after everything was written
        model/                  the engine's files (torch.distributed.checkpoint or DeepSpeed)
        scheduler.pt
        rng-rank00000.pt ...    one per rank: python and torch RNG states
        trainer_state.json      written last: step, data position, and {file: size} of all the above
      .tmp-step-00000300/       being written (or left by a kill): never read, removed on the next save

A checkpoint is complete when its trainer_state.json parses and every file it lists exists with its
recorded size. Resume takes the newest complete one; a corrupt or partial newest one is skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{checkpoint_name(step)}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


@dataclass(frozen=True, slots=True)
class Found:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories, oldest first (temp dirs excluded)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name))]
    return sorted(found)


def check_complete(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(state, "") for a complete checkpoint, else (None, why not)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return None, f"no {STATE_FILE}"
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"unreadable {STATE_FILE}: {exc}"
    files = state.get("files")
    if not isinstance(files, dict) or not files or "step" not in state:
        return None, f"{STATE_FILE} has no file list or step"
    for rel, size in files.items():
        try:
            actual = (path / rel).stat().st_size
        except OSError:
            return None, f"missing {rel}"
        if actual != size:
            return None, f"{rel} has {actual} bytes, expected {size}"
    return state, ""


def find_resumable(root: Path, log=print) -> list[Found]:
    """Complete checkpoints, newest first; incomplete ones are reported through `log` and skipped."""
    found = []
    for _, path in reversed(list_checkpoints(root)):
        state, why = check_complete(path)
        if state is None:
            log(f"[lmforge.train] skipping incomplete checkpoint {path}: {why}")
            continue
        found.append(Found(path, state))
    return found


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin(root: Path, step: int) -> Path:
    """Rank 0, before any rank writes: an empty temp dir for `step` (a stale one is removed)."""
    tmp = temp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank finished writing: manifest, fsync, rename into place, prune."""
    tmp, final = temp_dir(root, step), root / checkpoint_name(step)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.name != STATE_FILE:
            with p.open("rb") as f:
                os.fsync(f.fileno())
            files[p.relative_to(tmp).as_posix()] = p.stat().st_size
    state_path = tmp / STATE_FILE
    with state_path.open("w") as f:
        json.dump({**state, "files": files, "savedAt": time.time()}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # an incomplete checkpoint of the same step
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest `keep_last` checkpoints, and stale temp dirs of older steps."""
    committed = list_checkpoints(root)
    for _, path in committed[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    newest = committed[-1][0] if committed else -1
    for p in root.glob(".tmp-step-*"):
        m = _NAME_RE.match(p.name[len(".tmp-") :])
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if "numpy" in sys.modules:
        import numpy as np

        legacy_state = np.random.get_state()
        assert isinstance(legacy_state, tuple)  # legacy=True (the default): MT19937 as a tuple
        kind, keys, pos, has_gauss, gauss = legacy_state
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_rng(directory: Path, rank: int) -> None:
    torch.save(rng_state(), directory / rng_file(rank))


def load_rng(directory: Path, rank: int) -> bool:
    """Restores this rank's RNG states; False when the checkpoint has none for it (world size changed)."""
    path = directory / rng_file(rank)
    if not path.exists():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True
