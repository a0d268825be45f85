"""Rank 0 -> worker messages of a tensor-parallel engine: one message per call (a step's inputs, a KV
cache allocation, stop), written once and read by every worker.

Two transports with the same `send(obj)` / `recv()`:

    ShmRingChannel    a ring of slots in POSIX shared memory (/dev/shm): the writer pickles into the next
                      free slot and bumps its sequence number; readers poll it (spinning briefly, then
                      sleeping with backoff) and acknowledge. No syscall on the hot path.
    BroadcastChannel  torch.distributed broadcast over a gloo group: the size, then the bytes.

`bench/tp_message.py` measures both (µs per step message); the engine uses the ring by default.
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np

_HEADER_SLOTS = 64  # int64 words before the slots: [0] spare, [1 + i] reader i's last acknowledged seq
_SLOT_HEADER = 2  # int64 words per slot: seq, payload length
_SPIN_S = 2e-3  # a reader polls without sleeping this long after its last message...
_MAX_SLEEP_S = 5e-4  # ...then sleeps in doubling steps up to this (wake-up latency when idle)


class ChannelClosedError(RuntimeError):
    """The other side went away (or stopped answering within the timeout)."""


class ShmRingChannel:
    """Single writer (rank 0), `num_readers` readers (ranks 1..N-1, reader index = rank - 1)."""

    def __init__(
        self,
        num_readers: int,
        *,
        name: str | None = None,
        reader: int | None = None,
        num_slots: int = 8,
        slot_bytes: int = 4 << 20,
        timeout_s: float = 60.0,
    ):
        if num_readers + 1 > _HEADER_SLOTS:
            raise ValueError(f"at most {_HEADER_SLOTS - 1} readers")
        self.num_readers, self.reader, self.timeout_s = num_readers, reader, timeout_s
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        size = 8 * _HEADER_SLOTS + num_slots * (8 * _SLOT_HEADER + slot_bytes)
        if name is None:  # the writer creates it
            self.shm = shared_memory.SharedMemory(create=True, size=size)  # zero-filled
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            _untrack(self.shm)  # the writer owns it: a reader's exit must not unlink it
        self.name = self.shm.name
        self.header = np.ndarray((_HEADER_SLOTS,), dtype=np.int64, buffer=self.shm.buf)
        self.next_seq = 1
        self.parent_pid = os.getppid()

    def _slot(self, seq: int) -> tuple[np.ndarray, int]:
        index = seq % self.num_slots
        offset = 8 * _HEADER_SLOTS + index * (8 * _SLOT_HEADER + self.slot_bytes)
        words = np.ndarray((_SLOT_HEADER,), dtype=np.int64, buffer=self.shm.buf, offset=offset)
        return words, offset + 8 * _SLOT_HEADER

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.slot_bytes:
            raise ValueError(f"a {len(data)}-byte message exceeds the {self.slot_bytes}-byte ring slot")
        seq = self.next_seq
        acks = self.header[1 : 1 + self.num_readers]
        deadline = None
        while int(acks.min()) < seq - self.num_slots:  # the slot still holds a message someone has not read
            deadline = deadline or time.monotonic() + self.timeout_s
            if time.monotonic() > deadline:
                raise ChannelClosedError(
                    f"a worker has not read message {seq - self.num_slots} in {self.timeout_s}s"
                )
            time.sleep(0)
        words, offset = self._slot(seq)
        buf = self.shm.buf
        assert buf is not None  # open until close()
        buf[offset : offset + len(data)] = data
        words[1] = len(data)
        words[0] = seq  # last: readers take the slot once they see its sequence number
        self.next_seq = seq + 1

    def recv(self, poll_parent: bool = True) -> Any:
        seq = self.next_seq
        words, offset = self._slot(seq)
        start = checked = time.monotonic()
        sleep_s = 0.0
        while int(words[0]) != seq:
            now = time.monotonic()
            if now - start < _SPIN_S:  # a step's message usually follows the last one within this
                continue
            sleep_s = min(_MAX_SLEEP_S, sleep_s * 2 or 1e-5)  # idle: back off, stay responsive
            time.sleep(sleep_s)
            if poll_parent and now - checked > 0.5:
                checked = now
                if os.getppid() != self.parent_pid:
                    raise ChannelClosedError("rank 0 exited")
        length = int(words[1])
        buf = self.shm.buf
        assert buf is not None  # open until close()
        obj = pickle.loads(buf[offset : offset + length])
        assert self.reader is not None
        self.header[1 + self.reader] = seq
        self.next_seq = seq + 1
        return obj

    def close(self, unlink: bool = False) -> None:
        del self.header
        self.shm.close()
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Python < 3.13 registers every attached segment with the resource tracker, which unlinks it when
    this process exits (bpo-39959); only the creator should."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort
        pass


class BroadcastChannel:
    """torch.distributed broadcast from rank 0 over `group` (gloo; None: the default group)."""

    def __init__(self, group: Any = None):
        import torch

        self.group = group
        self._size = torch.zeros(1, dtype=torch.int64)

    def send(self, obj: Any) -> None:
        import torch
        import torch.distributed as dist

        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._size[0] = len(data)
        dist.broadcast(self._size, 0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def recv(self, poll_parent: bool = True) -> Any:
        import torch
        import torch.distributed as dist

        dist.broadcast(self._size, 0, group=self.group)
        buf = torch.empty(int(self._size[0]), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return pickle.loads(buf.numpy().tobytes())

    def close(self, unlink: bool = False) -> None:
        pass
