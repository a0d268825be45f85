"""The local cluster's supervisor (devcluster/cluster/supervisor.py): its restart backoff, and a
real restart of a (fake) component that exits."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from lmforge.devcluster.cluster import cluster, processes
from lmforge.devcluster.cluster.supervisor import MAX_DELAY_S, MODULE, restart_delay


def test_restart_delay_grows_and_is_capped() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4, 5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == MAX_DELAY_S


@pytest.mark.timeout(60)
def test_a_component_that_exits_is_restarted_with_a_log_line(tmp_path, monkeypatch) -> None:
    """state.json as `cluster up` writes it, one fake component (a shell loop); kill it and the
    supervisor starts it again from the argv `components()` builds, and records the new pid."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "kubectl",
        "helm",
    ):
        script = bin_dir / name
        script.write_text("#!/bin/sh\nwhile :; do sleep 0.2; done\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    state_dir = tmp_path / "state"
    layout = cluster.layout_for(state_dir)
    state_dir.mkdir()
    first = processes.start("kube-scheduler", [str(bin_dir / "kube-scheduler")], layout.logs)
    state = {
        "apiserver": "https://127.0.0.1:1",
        "kubeconfig": str(layout.admin_kubeconfig),
        "bin_dir": str(bin_dir),
        "ports": {
            "etcd_client": 1,
            "etcd_peer": 2,
            "apiserver": 3,
            "controller_manager": 4,
            "scheduler": 5,
            "kwok": 6,
        },
        "processes": [
            {**first.to_dict(), "health_url": "https://127.0.0.1:5/healthz", "verify_with_ca": False}
        ],
        "ready": True,
    }
    layout.state_file.write_text(json.dumps(state))
    supervisor = subprocess.Popen(
        [sys.executable, "-P", "-m", MODULE, str(state_dir)],
        stdout=open(tmp_path / "supervisor.log", "w"),
        stderr=subprocess.STDOUT,
    )
    seen: list[processes.Process] = [first]
    try:
        state["supervisor"] = {
            "name": "supervisor",
            "pid": supervisor.pid,
            "binary": sys.executable,
            "ports": [],
            "log": str(tmp_path / "supervisor.log"),
        }
        layout.state_file.write_text(json.dumps(state))
        os.kill(first.pid, signal.SIGKILL)

        def restarted() -> bool:
            current = processes.Process.from_dict(json.loads(layout.state_file.read_text())["processes"][0])
            if current.pid != first.pid:
                seen.append(current)
            return current.pid != first.pid and processes.is_alive(current)

        assert processes.wait_until(restarted, 30), (tmp_path / "supervisor.log").read_text()
        log = (tmp_path / "supervisor.log").read_text()
        assert f"kube-scheduler (pid {first.pid}) exited: restarting it" in log
        layout.state_file.unlink()  # `cluster down`: the supervisor goes
        assert supervisor.wait(timeout=10) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for process in seen:
            processes.stop(process, timeout=2)
