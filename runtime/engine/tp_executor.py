"""Rank 0's side of a tensor-parallel engine: spawns the workers, joins the process group, forwards the
model runner's calls (one channel message each) and watches the workers.

A worker that exits, or a step that makes no progress within `timeout_s` (a hung worker: the collective
never returns; the watchdog then kills the workers, which fails rank 0's collective), is fatal:
`failure` is set and the `on_failure` callbacks run on the watchdog thread (the server fails every
request and exits non-zero; Kubernetes restarts the pod). Nothing is retried:
the other ranks' state (KV cache contents, collectives in flight) is gone with the worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from lmforge.runtime.engine.tp_worker import WorkerSpec, backend_for, init_distributed, open_channel

logger = logging.getLogger("lmforge.runtime.engine.tp_executor")

CHANNELS = ("shm", "broadcast")


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or hung: the engine cannot go on (fatal)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TPDriver:
    """Workers 1..N-1 as `python -P -m lmforge.runtime.engine.tp_worker` processes; rank 0 is this one."""

    def __init__(self, spec: WorkerSpec, *, poll_s: float = 0.1):
        self.world_size, self.timeout_s = spec.world_size, spec.timeout_s
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._closing = False
        self._step_started: float | None = None  # monotonic start of the forward in flight
        self.channel: Any = None
        ring = None
        if spec.channel == "shm":
            from lmforge.runtime.engine.tp_channel import ShmRingChannel

            ring = ShmRingChannel(spec.world_size - 1, timeout_s=spec.timeout_s)
        spec = _with(spec, shm_name=ring.name if ring else "", init_method=f"tcp://127.0.0.1:{_free_port()}")
        self.spec = spec
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "lmforge.runtime.engine.tp_worker",
                    _with(spec, rank=r).to_json(),
                ],
                env=env,
            )
            for r in range(1, spec.world_size)
        ]
        atexit.register(self.close)
        logger.info(
            "tensor parallel: %d ranks (%s, %s channel); worker pids %s",
            spec.world_size,
            backend_for(spec.device),
            spec.channel,
            [p.pid for p in self.procs],
        )
        self._watchdog = threading.Thread(
            target=self._watch, args=(poll_s,), name="lmforge-tp-watchdog", daemon=True
        )
        self._watchdog.start()
        try:
            init_distributed(_with(spec, rank=0))
            self.channel = ring if ring is not None else open_channel(spec, reader=None)
        except BaseException:
            if ring is not None:
                ring.close(unlink=True)
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_loaded(self) -> None:
        """After rank 0 built its shard: every worker has built its own (their barrier)."""
        import torch.distributed as dist

        self._guarded(dist.barrier)

    def call(self, method: str, *args: Any) -> None:
        """The workers make this ModelRunner call; rank 0 makes it right after (collectives pair up)."""
        self.check()
        if method == "forward_step":
            self._step_started = time.monotonic()
        self.channel.send((method, args))

    def step_done(self) -> None:
        self._step_started = None

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerFailedError(self.failure)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a collective failed: name the worker if one died
            time.sleep(0.3)  # let the watchdog see the exit
            self.check()
            raise WorkerFailedError(f"tensor parallel collective failed: {exc}") from exc

    def _fail(self, reason: str) -> None:
        if self.failure is not None or self._closing:
            return
        self.failure = reason
        logger.error("tensor parallel engine failed: %s", reason)
        for callback in list(self.on_failure):
            try:
                callback(reason)
            except Exception:  # noqa: BLE001
                logger.exception("failure callback raised")

    def _watch(self, poll_s: float) -> None:
        while not self._closing and self.failure is None:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._closing:
                    self._fail(f"tensor parallel worker rank {rank} (pid {proc.pid}) exited with code {code}")
                    return
            started = self._step_started
            if started is not None and time.monotonic() - started > self.timeout_s:
                self._fail(f"a tensor parallel step made no progress in {self.timeout_s:g}s (a worker hung)")
                for proc in self.procs:  # a dead peer fails rank 0's pending collective now
                    proc.kill()
                return
            time.sleep(poll_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the workers (a "stop" message; SIGKILL after timeout_s) and leaves the process group."""
        if self._closing:
            return
        self._closing = True
        if self.channel is not None and self.failure is None:
            try:
                self.channel.send(("stop", ()))
            except Exception:  # noqa: BLE001 - a worker is gone: kill below
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.channel is not None:
            self.channel.close(unlink=True)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            logger.debug("destroy_process_group failed", exc_info=True)
        atexit.unregister(self.close)


def _with(spec: WorkerSpec, **changes: Any) -> WorkerSpec:
    from dataclasses import replace

    return replace(spec, **changes)
