"""The operator process against the real API server: it starts, takes part in peering, steps
aside for a higher-priority replica, and exits 0 on SIGTERM, leaving the peering object clean."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def start_operator(cluster, operator_process):
    """A peering replica (not standalone) with a liveness endpoint; the peering CRD applied first."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
    return lambda name, *args: operator_process(*args, standalone=False, liveness=True, name=name)


def _peers(cluster, name: str) -> dict:
    obj = cluster.kubectl_json("get", "clusterkopfpeering", name)
    return obj.get("status") or {}


def test_operator_peers_and_exits_cleanly_on_sigterm(cluster, start_operator, wait_for) -> None:
    op = start_operator("solo", "--peering", "e2e-solo")
    wait_for(op.healthy, timeout=60, message=lambda: f"liveness endpoint never answered:\n{op.logs()}")
    wait_for(
        lambda: len(_peers(cluster, "e2e-solo")) == 1,
        timeout=60,
        message=lambda: f"operator never announced itself in the peering object:\n{op.logs()}",
    )
    assert op.stop() == 0, op.logs()
    wait_for(
        lambda: _peers(cluster, "e2e-solo") == {},
        timeout=30,
        message="operator left its entry in the peering object after SIGTERM",
    )
    for line in op.logs().splitlines():  # structured logs: every line is a JSON object
        json.loads(line)


def _never(predicate, seconds: float) -> bool:
    """True if `predicate` stays false for `seconds` (polled): a bounded check that a replica
    keeps standing by."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return False
        time.sleep(0.25)
    return True


def test_lower_priority_replica_stands_by(cluster, start_operator, wait_for) -> None:
    """Mandatory peering starts every replica paused; only the highest live priority resumes."""
    resumed = "Resuming operations after the pause"
    high = start_operator("high", "--peering", "e2e-pair", "--priority", "200")
    wait_for(lambda: resumed in high.logs(), timeout=60, message=high.logs)
    low = start_operator("low", "--peering", "e2e-pair", "--priority", "100")
    wait_for(lambda: len(_peers(cluster, "e2e-pair")) == 2, timeout=60, message=low.logs)
    assert _never(lambda: resumed in low.logs(), seconds=5), low.logs()
    assert high.stop() == 0
    wait_for(
        lambda: resumed in low.logs(),
        timeout=90,
        message=lambda: f"the standby did not take over after the leader stopped:\n{low.logs()}",
    )
    assert low.stop() == 0
