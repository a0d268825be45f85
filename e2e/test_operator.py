"""The operator process against the real API server: it starts, takes part in peering, steps
aside for a higher-priority replica, and exits 0 on SIGTERM, leaving the peering object clean."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
LMFORGE = str(Path(sys.executable).parent / "lmforge")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    def __init__(self, kubeconfig: str, log_path: Path, *args: str) -> None:
        self.port = _free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.proc = subprocess.Popen(
            [LMFORGE, "operator", "run", "--liveness-port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


@pytest.fixture
def start_operator(cluster, tmp_path) -> Iterator:
    cluster.kubectl("apply", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
    started: list[OperatorProcess] = []

    def start(name: str, *args: str) -> OperatorProcess:
        op = OperatorProcess(str(cluster.kubeconfig), tmp_path / f"{name}.log", *args)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


def _peers(cluster, name: str) -> dict:
    obj = cluster.kubectl_json("get", "clusterkopfpeering", name)
    return obj.get("status") or {}


def test_operator_peers_and_exits_cleanly_on_sigterm(cluster, start_operator, wait_for) -> None:
    op = start_operator("solo", "--peering", "e2e-solo")
    wait_for(op.healthy, timeout=60, message=lambda: f"liveness endpoint never answered:\n{op.log()}")
    wait_for(lambda: len(_peers(cluster, "e2e-solo")) == 1, timeout=60,
             message=lambda: f"operator never announced itself in the peering object:\n{op.log()}")
    assert op.stop() == 0, op.log()
    wait_for(lambda: _peers(cluster, "e2e-solo") == {}, timeout=30,
             message="operator left its entry in the peering object after SIGTERM")
    for line in op.log().splitlines():  # structured logs: every line is a JSON object
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
    wait_for(lambda: resumed in high.log(), timeout=60, message=high.log)
    low = start_operator("low", "--peering", "e2e-pair", "--priority", "100")
    wait_for(lambda: len(_peers(cluster, "e2e-pair")) == 2, timeout=60, message=low.log)
    assert _never(lambda: resumed in low.log(), seconds=5), low.log()
    assert high.stop() == 0
    wait_for(lambda: resumed in low.log(), timeout=90,
             message=lambda: f"the standby did not take over after the leader stopped:\n{low.log()}")
    assert low.stop() == 0
