"""The operator's process supervisor: it decides when the process is dead, answers /healthz, and
guarantees that SIGTERM ends the process.

Why it exists: kopf runs every reconciler as tasks of one event loop. When one of its eternal
tasks dies (e.g. the peering keep-alive after its retries ran out during a long API-server
outage), kopf begins a shutdown that can hang on a task that never finishes; the process then
stays alive with no handler running, its own /healthz gone and its SIGTERM handler lost with the
loop. So kopf runs in a thread of its own and the main thread (signals, /healthz, this watchdog)
never depends on kopf's loop:

- kopf's loop beats a `Heartbeat` every second and lists its eternal tasks that failed or ended;
- `verdict` (pure) turns that into "keep running", "exit 0" (a requested stop is done, or took
  longer than STOP_DEADLINE_S) or "exit 1" (reconcilers dead or the loop stuck): Kubernetes then
  restarts the container, which is the recovery kopf could not do in-process;
- /healthz answers 200 only while the verdict is "keep running" and kopf has started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("lmforge.operator")

BEAT_INTERVAL_S = 1.0
STALE_BEAT_S = 30.0  # kopf's loop did not beat for this long: blocked or dead
STOP_DEADLINE_S = 8.0  # SIGTERM -> exit, even when kopf's own shutdown hangs (pods get 30 s)
DEAD_GRACE_S = 5.0  # dead reconcilers: time for kopf to stop cleanly (and release its peering record)
# kopf's eternal tasks (kopf/_core/reactor/running.py): any of them ending means nothing reconciles.
ETERNAL_TASKS = (
    "multidimensional multitasker",
    "resource observer",
    "namespace observer",
    "poster of events",
    "daemon killer",
    "startup/cleanup activities",
)
ETERNAL_PREFIXES = ("peering keep-alive for ", "peering observer for ")


@dataclass(frozen=True, slots=True)
class TaskState:
    """What the watchdog needs to know about one asyncio task of kopf's loop."""

    name: str
    done: bool
    cancelled: bool = False
    failed: bool = False  # ended with an exception


def dead_tasks(tasks: Iterable[TaskState]) -> tuple[str, ...]:
    """Names of kopf's eternal tasks that failed or ended on their own. A cancelled one is not
    dead: kopf cancels a namespace's peering tasks when that namespace goes away."""
    return tuple(
        sorted(
            t.name
            for t in tasks
            if t.done and not t.cancelled and (t.name in ETERNAL_TASKS or t.name.startswith(ETERNAL_PREFIXES))
        )
    )


@dataclass(slots=True)
class Heartbeat:
    """Written by kopf's loop (one writer), read by the main thread."""

    started: bool = False
    last_beat: float | None = None  # time.monotonic()
    dead: tuple[str, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def beat(self, dead: tuple[str, ...]) -> None:
        with self.lock:
            self.started, self.last_beat, self.dead = True, time.monotonic(), dead

    def snapshot(self) -> tuple[bool, float | None, tuple[str, ...]]:
        with self.lock:
            return self.started, self.last_beat, self.dead


@dataclass(frozen=True, slots=True)
class Verdict:
    exit_code: int | None  # None: keep running
    reason: str
    healthy: bool


def verdict(
    now: float,
    *,
    kopf_running: bool,
    started: bool,
    last_beat: float | None,
    dead: tuple[str, ...],
    stop_requested_at: float | None,
    dead_since: float | None,
) -> Verdict:
    """The whole exit policy, pure (unit-tested with made-up clocks)."""
    if stop_requested_at is not None:
        if not kopf_running:
            return Verdict(0, "stopped", False)
        if now - stop_requested_at >= STOP_DEADLINE_S:
            return Verdict(
                0,
                f"kopf did not stop within {STOP_DEADLINE_S:.0f} s of the stop request: exiting anyway",
                False,
            )
        return Verdict(None, "stopping", False)
    if not kopf_running:
        return Verdict(
            1, "kopf stopped on its own (see the log above): exiting so that Kubernetes restarts us", False
        )
    if dead:
        if dead_since is not None and now - dead_since >= DEAD_GRACE_S:
            return Verdict(
                1, f"reconcilers are dead ({', '.join(dead)}): exiting so that Kubernetes restarts us", False
            )
        return Verdict(None, f"reconcilers are dead ({', '.join(dead)})", False)
    if started and last_beat is not None and now - last_beat >= STALE_BEAT_S:
        return Verdict(
            1,
            f"kopf's event loop has not run for {now - last_beat:.0f} s: exiting so that Kubernetes "
            "restarts us",
            False,
        )
    return Verdict(None, "ok" if started else "starting", started)


class _TaskTracker:
    """asyncio.all_tasks() forgets finished tasks; kopf's eternal tasks are kept here once seen so
    that one that died is still reported."""

    def __init__(self) -> None:
        self.seen: dict[str, asyncio.Task] = {}

    def states(self) -> list[TaskState]:
        for task in asyncio.all_tasks():
            name = task.get_name()
            if name in ETERNAL_TASKS or name.startswith(ETERNAL_PREFIXES):
                self.seen[f"{name}#{id(task)}"] = task
        out = []
        for key, task in list(self.seen.items()):
            done = task.done()
            cancelled = done and task.cancelled()
            out.append(
                TaskState(
                    name=task.get_name(),
                    done=done,
                    cancelled=cancelled,
                    failed=done and not cancelled and task.exception() is not None,
                )
            )
            if cancelled:
                del self.seen[key]
        return out


async def watch_kopf(heartbeat: Heartbeat) -> None:
    """The loop-side half: beat every second with the dead eternal tasks."""
    tracker = _TaskTracker()
    while True:
        heartbeat.beat(dead_tasks(tracker.states()))
        await asyncio.sleep(BEAT_INTERVAL_S)


class LivenessServer:
    """GET /healthz in a thread of the main side: 200 {"status": "ok"} or 503 with the reason."""

    def __init__(self, port: int, probe) -> None:
        probe_fn = probe

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/healthz", "/livez"):
                    self.send_error(404)
                    return
                current = probe_fn()
                body = json.dumps({"status": "ok" if current.healthy else current.reason}).encode()
                self.send_response(200 if current.healthy else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:  # probes every few seconds: not worth a line
                return

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="liveness", daemon=True)

    def start(self) -> LivenessServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
