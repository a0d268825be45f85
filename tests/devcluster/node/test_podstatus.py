"""Container states -> pod phase and status; the node's manifest and status."""

from __future__ import annotations

import pytest

from lmforge.devcluster.node import node
from lmforge.devcluster.node.container import backoff_seconds, exit_code
from lmforge.devcluster.node.podstatus import ContainerState, phase, pod_status


def state(kind: str, code: int | None = None, restarts: int = 0, ready: bool = False) -> ContainerState:
    return ContainerState(
        name="c",
        state=kind,
        exit_code=code,
        restart_count=restarts,
        ready=ready,
        started_at="t0",
        finished_at="t1" if kind == "terminated" else None,
        reason="Error" if code else ("Completed" if code == 0 else ""),
    )


@pytest.mark.parametrize(
    "states,want",
    [
        ([state("waiting")], "Pending"),
        ([state("running")], "Running"),
        ([state("terminated", 0)], "Succeeded"),
        ([state("terminated", 3)], "Failed"),
        ([state("terminated", 0), state("running")], "Running"),
        ([state("waiting", restarts=2)], "Running"),  # crash-looping
    ],
    ids=["creating", "running", "succeeded", "failed", "one-still-running", "backoff"],
)
def test_phase(states, want):
    assert phase(states, "Never") == want


def test_pod_status_running_ready():
    status = pod_status([state("running", ready=True)], "Always", "127.0.1.2", "127.0.0.1", "t0", "t0")
    assert status["phase"] == "Running" and status["podIP"] == "127.0.1.2"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    assert status["containerStatuses"][0]["state"] == {"running": {"startedAt": "t0"}}


def test_pod_status_failed_carries_exit_code():
    status = pod_status([state("terminated", 7)], "Never", "127.0.1.2", "127.0.0.1", "t0", "t1")
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (status["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 7, "Error")


@pytest.mark.parametrize("returncode,want", [(0, 0), (3, 3), (-9, 137), (-15, 143)])
def test_exit_code(returncode, want):
    assert exit_code(returncode) == want


def test_backoff_doubles_and_caps():
    assert [backoff_seconds(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 60.0]


def test_node_manifest_is_tainted_and_not_kwok():
    manifest = node.node_manifest()
    assert manifest["spec"]["taints"] == [
        {"key": "lmforge.dev/process-node", "value": "true", "effect": "NoSchedule"}
    ]
    assert "annotations" not in manifest["metadata"]
    assert manifest["metadata"]["labels"]["lmforge.dev/node-type"] == "process"
    status = node.node_status(10250, cap={"cpu": "2", "memory": "1Ki", "pods": "110"})
    assert status["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"


@pytest.mark.parametrize(
    "init,policy,want_init,want_phase",
    [
        ([state("running")], "Always", "running", "Pending"),
        ([state("terminated", 0), state("running")], "Always", "running", "Pending"),
        ([state("terminated", 0), state("terminated", 0)], "Always", "done", "Running"),
        ([state("terminated", 1)], "Never", "failed", "Failed"),
        ([state("waiting", restarts=1)], "Always", "running", "Pending"),  # restarted after a failure
    ],
    ids=["first-running", "second-running", "all-done", "failed-never", "crash-looping"],
)
def test_init_containers_gate_the_pod(init, policy, want_init, want_phase):
    from lmforge.devcluster.node.podstatus import init_outcome

    main = [state("running", ready=True)] if want_init == "done" else [state("waiting")]
    assert init_outcome(init, policy) == want_init
    status = pod_status(main, policy, "127.0.1.2", "127.0.0.1", "t0", "t0", init_containers=init)
    assert status["phase"] == want_phase
    initialized = next(c for c in status["conditions"] if c["type"] == "Initialized")
    assert initialized["status"] == ("True" if want_init == "done" else "False")
    assert len(status["initContainerStatuses"]) == len(init)
