"""The operator's exit policy (operator/watchdog.py): pure, with made-up clocks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from lmforge.devcluster.pipeline import free_port
from lmforge.operator.watchdog import (
    DEAD_GRACE_S,
    STALE_BEAT_S,
    STOP_DEADLINE_S,
    LivenessServer,
    TaskState,
    Verdict,
    dead_tasks,
    verdict,
)


def judge(now: float = 100.0, **kw) -> Verdict:
    args = {
        "kopf_running": True,
        "started": True,
        "last_beat": now - 1,
        "dead": (),
        "stop_requested_at": None,
        "dead_since": None,
    } | kw
    return verdict(now, **args)


def test_a_running_operator_is_healthy() -> None:
    assert judge() == Verdict(None, "ok", True)
    assert judge(started=False, last_beat=None) == Verdict(None, "starting", False)


def test_a_stop_request_exits_0_when_kopf_is_done_or_after_the_deadline() -> None:
    assert judge(stop_requested_at=99.0).exit_code is None
    assert judge(stop_requested_at=99.0, kopf_running=False).exit_code == 0
    late = judge(now=100.0, stop_requested_at=100.0 - STOP_DEADLINE_S)
    assert late.exit_code == 0 and "did not stop" in late.reason
    assert STOP_DEADLINE_S < 10  # SIGTERM always exits within 10 s


def test_dead_reconcilers_exit_1_after_a_grace_and_fail_liveness_at_once() -> None:
    dead = ("peering keep-alive for lmforge@None",)
    first = judge(dead=dead, dead_since=100.0)
    assert (first.exit_code, first.healthy) == (None, False)
    assert judge(now=100.0 + DEAD_GRACE_S, dead=dead, dead_since=100.0).exit_code == 1


def test_kopf_ending_on_its_own_or_a_stuck_loop_exit_1() -> None:
    assert judge(kopf_running=False).exit_code == 1
    assert judge(now=100.0, last_beat=100.0 - STALE_BEAT_S).exit_code == 1


@pytest.mark.parametrize(
    ("task", "dead"),
    [
        (TaskState("multidimensional multitasker", done=True, failed=True), True),
        (TaskState("peering keep-alive for lmforge@team-a", done=True, failed=True), True),
        (TaskState("namespace observer", done=True), True),  # eternal: finishing at all is death
        (
            TaskState("peering keep-alive for lmforge@team-a", done=True, cancelled=True),
            False,
        ),  # namespace gone
        (TaskState("multidimensional multitasker", done=False), False),
        (TaskState("some handler", done=True, failed=True), False),
    ],
    ids=[
        "multitasker-failed",
        "keepalive-failed",
        "observer-ended",
        "keepalive-cancelled",
        "running",
        "not-eternal",
    ],
)
def test_dead_tasks(task: TaskState, dead: bool) -> None:
    assert bool(dead_tasks([task])) is dead


def test_liveness_endpoint_follows_the_verdict() -> None:
    current = [Verdict(None, "ok", True)]
    port = free_port()
    server = LivenessServer(port, lambda: current[0]).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
        current[0] = Verdict(None, "reconcilers are dead (namespace observer)", False)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert error.value.code == 503
    finally:
        server.close()
