"""InferenceService status from a Deployment and its pods: phases, conditions, lastFailure, Events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lmforge.operator.api.base import LastFailure
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders.inferenceservice_status import (
    DeploymentView,
    ServingPod,
    record_autoscaling,
    reflect,
)
from lmforge.operator.decision import Event as StatusEvent

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
URL = "http://chat.team-a.svc.cluster.local/v1"


def make_spec(**overrides: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"source": "pvc://models/llama"}, **overrides})


def pod(name: str, state: str = "serving", **fields: Any) -> ServingPod:
    """state: serving | loading | pending | unready | crashloop | failed | deleting."""
    base = {
        "serving": dict(phase="Running", ready=True, started=True),
        "loading": dict(phase="Running", ready=False, started=False),
        "pending": dict(phase="Pending"),
        "unready": dict(phase="Running", ready=False, started=True),
        "crashloop": dict(
            phase="Running",
            waiting_reason="CrashLoopBackOff",
            exit_code=1,
            reason="Error",
            message="CUDA out of memory",
            finished_at=T0 - timedelta(seconds=30),
        ),
        "failed": dict(
            phase="Failed",
            exit_code=1,
            reason="Error",
            message="lmforge.dev/fate=fail-1",
            finished_at=T0 - timedelta(seconds=10),
        ),
        "deleting": dict(phase="Running", ready=True, started=True, deleting=True),
    }[state]
    return ServingPod(name=name, node="kwok-node-0", **{**base, **fields})


def previous(**fields: Any) -> InferenceServiceStatus:
    return InferenceServiceStatus(
        url=URL, selector="lmforge.dev/inferenceservice=chat", observed_generation=1, **fields
    )


def conditions(status: InferenceServiceStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("replicas", "pods", "phase", "ready", "counted", "conds"),
    [
        pytest.param(
            None,
            [],
            "Pending",
            0,
            0,
            {
                "Ready": ("False", "PodsPending"),
                "Progressing": ("False", "Settled"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="no-deployment",
        ),
        pytest.param(
            2,
            [pod("a", "pending"), pod("b", "pending")],
            "Pending",
            0,
            2,
            {
                "Ready": ("False", "PodsPending"),
                "Progressing": ("True", "PodsPending"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="pods-pending",
        ),
        pytest.param(
            2,
            [pod("a", "loading"), pod("b", "pending")],
            "Loading",
            0,
            2,
            {
                "Ready": ("False", "ModelLoading"),
                "Progressing": ("True", "ModelLoading"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="loading",
        ),
        pytest.param(
            2,
            [pod("a"), pod("b")],
            "Ready",
            2,
            2,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "Settled"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="ready",
        ),
        pytest.param(
            3,
            [pod("a"), pod("b"), pod("c", "loading")],
            "Ready",
            2,
            3,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("True", "ModelLoading"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="scale-up-loading-is-not-degraded",
        ),
        pytest.param(
            2,
            [pod("a"), pod("b", "unready")],
            "Degraded",
            1,
            2,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "ReplicasNotReady"),
                "Degraded": ("True", "ReplicasNotReady"),
            },
            id="fell-out-of-readiness",
        ),
        pytest.param(
            2,
            [pod("a"), pod("b", "crashloop")],
            "Degraded",
            1,
            2,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "ReplicasFailing"),
                "Degraded": ("True", "ReplicasFailing"),
            },
            id="one-crash-looping",
        ),
        pytest.param(
            1,
            [pod("a", "crashloop")],
            "Failed",
            0,
            1,
            {
                "Ready": ("False", "ReplicasFailing"),
                "Progressing": ("False", "ReplicasFailing"),
                "Degraded": ("True", "ReplicasFailing"),
            },
            id="all-crash-looping",
        ),
        pytest.param(
            1,
            [pod("a", "failed"), pod("b")],
            "Degraded",
            1,
            1,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "Settled"),
                "Degraded": ("True", "ReplicasFailing"),
            },
            id="recently-failed-pod-replaced",
        ),
        pytest.param(
            1,
            [pod("a", "failed", finished_at=T0 - timedelta(minutes=6)), pod("b")],
            "Ready",
            1,
            1,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "Settled"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="old-failure-forgotten",
        ),
        pytest.param(
            0,
            [pod("a", "deleting")],
            "ScaledToZero",
            0,
            0,
            {
                "Ready": ("False", "ScaledToZero"),
                "Progressing": ("False", "Settled"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="scaled-to-zero",
        ),
        pytest.param(
            1,
            [pod("a"), pod("b")],
            "Ready",
            2,
            2,
            {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("True", "ScalingDown"),
                "Degraded": ("False", "AllReplicasHealthy"),
            },
            id="scaling-down",
        ),
    ],
)
def test_phase_and_conditions(
    replicas: int | None, pods: list[ServingPod], phase: str, ready: int, counted: int, conds: dict
) -> None:
    view = (
        None
        if replicas is None
        else DeploymentView(replicas=replicas, generation=1, observed_generation=1, updated_replicas=replicas)
    )
    got = reflect("chat", make_spec(), previous(), view, pods, T0).status
    assert (got.phase, got.ready_replicas, got.replicas) == (phase, ready, counted)
    assert conditions(got) == conds


def test_rolling_update_and_unschedulable_are_progress() -> None:
    rolling = DeploymentView(replicas=2, generation=2, observed_generation=2, updated_replicas=1)
    got = reflect(
        "chat", make_spec(), previous(), rolling, [pod("a"), pod("b"), pod("c", "loading")], T0
    ).status
    assert conditions(got)["Progressing"] == ("True", "RollingUpdate")
    view = DeploymentView(replicas=2, generation=1, observed_generation=1, updated_replicas=2)
    stuck = pod("b", "pending", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    got = reflect("chat", make_spec(), previous(), view, [pod("a"), stuck], T0).status
    cond = next(c for c in got.conditions if c.type == "Progressing")
    assert (cond.reason, cond.message) == (
        "Unschedulable",
        "1 replica(s) cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )


def test_transitions_post_events_and_keep_condition_times() -> None:
    view = DeploymentView(replicas=1, generation=1, observed_generation=1, updated_replicas=1)
    loading = reflect("chat", make_spec(), previous(), view, [pod("a", "loading")], T0)
    assert loading.events == (StatusEvent("Normal", "ModelLoading", "replicas are loading the model"),)
    ready = reflect("chat", make_spec(), loading.status, view, [pod("a")], T0 + timedelta(seconds=90))
    assert ready.events == (StatusEvent("Normal", "Ready", f"1/1 replicas ready at {URL}"),)
    again = reflect("chat", make_spec(), ready.status, view, [pod("a")], T0 + timedelta(seconds=95))
    assert again.events == ()
    assert again.status == ready.status  # nothing moved: nothing to write
    times = {c.type: c.last_transition_time for c in again.status.conditions}
    assert times["Ready"] == T0 + timedelta(seconds=90) and times["Degraded"] == T0


def test_last_failure_from_a_failed_pod_once() -> None:
    view = DeploymentView(replicas=2, generation=1, observed_generation=1, updated_replicas=2)
    first = reflect(
        "chat", make_spec(), previous(phase="Ready"), view, [pod("a"), pod("b", "failed"), pod("c")], T0
    )
    assert first.status.last_failure == LastFailure(
        pod="b",
        node="kwok-node-0",
        exit_code=1,
        reason="Error",
        message="lmforge.dev/fate=fail-1",
        time=T0 - timedelta(seconds=10),
    )
    assert first.events == (
        StatusEvent("Warning", "PodFailed", "pod b failed: Error, exit code 1, lmforge.dev/fate=fail-1"),
        StatusEvent("Warning", "Degraded", "2/2 replicas ready (last failure: pod b, Error)"),
    )
    second = reflect("chat", make_spec(), first.status, view, [pod("a"), pod("b", "failed"), pod("c")], T0)
    assert second.events == ()


def test_crash_loop_reports_the_last_termination() -> None:
    view = DeploymentView(replicas=1, generation=1, observed_generation=1, updated_replicas=1)
    got = reflect("chat", make_spec(), previous(), view, [pod("a", "crashloop")], T0)
    assert got.status.last_failure.reason == "CrashLoopBackOff"
    assert got.status.last_failure.message == "CUDA out of memory"
    assert got.events[-1] == StatusEvent(
        "Warning", "Failed", "no replica can serve (last failure: pod a, CrashLoopBackOff)"
    )


def test_scale_to_zero_condition_explains_the_cold_start() -> None:
    spec = make_spec(
        autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownStabilizationSeconds": 600},
        startupTimeoutSeconds=900,
    )
    got = reflect("chat", spec, previous(), DeploymentView(replicas=0), [], T0).status
    cond = next(c for c in got.conditions if c.type == "ScaleToZero")
    assert (cond.status, cond.reason) == ("True", "ColdStartAfterIdle")
    assert "after 600s without running or waiting requests" in cond.message
    assert "waits for a cold start (a new pod loads the model, up to 900s)" in cond.message
    assert "no activator yet" in cond.message and "kubectl scale deployment/chat --replicas 1" in cond.message
    back = reflect("chat", make_spec(), got, DeploymentView(replicas=0), [], T0).status
    assert "ScaleToZero" not in conditions(back)


def test_record_autoscaling_keeps_the_last_ten_changes() -> None:
    status = previous()
    for i in range(12):
        status, event = record_autoscaling(
            status,
            desired=i + 2,
            metric_value=9.51234,
            reason=f"r{i}",
            scaled_from=i + 1,
            scaled_to=i + 2,
            now=T0 + timedelta(seconds=i),
        )
        assert event == StatusEvent("Normal", "ScaledUp", f"r{i}")
    assert [h.reason for h in status.history] == [f"r{i}" for i in range(2, 12)]
    assert status.autoscaling.current_metric_value == 9.5123
    assert status.autoscaling.last_scale_time == T0 + timedelta(seconds=11)
    held, event = record_autoscaling(
        status, desired=13, metric_value=4.0, reason="hold", now=T0 + timedelta(minutes=1)
    )
    assert event is None and held.history == status.history
    assert (
        held.autoscaling.last_scale_time == T0 + timedelta(seconds=11)
        and held.autoscaling.last_decision == "hold"
    )


def test_serving_pod_from_a_kwok_failed_pod() -> None:
    body = {
        "metadata": {"name": "chat-7d9-abc"},
        "spec": {"nodeName": "kwok-node-0"},
        "status": {
            "phase": "Failed",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "server",
                    "ready": False,
                    "started": False,
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "lmforge.dev/fate=fail-1",
                            "finishedAt": "2025-01-01T12:00:00Z",
                        }
                    },
                }
            ],
        },
    }
    assert ServingPod.from_pod(body) == ServingPod(
        name="chat-7d9-abc",
        phase="Failed",
        ready=False,
        started=False,
        ip="10.0.0.7",
        node="kwok-node-0",
        exit_code=1,
        reason="Error",
        message="lmforge.dev/fate=fail-1",
        finished_at=T0,
    )


def test_serving_pod_crash_looping_and_unschedulable() -> None:
    crash = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "server",
                    "started": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        },
    }
    got = ServingPod.from_pod(crash)
    assert (got.crash_looping, got.exit_code, got.reason, got.loading) == (True, 137, "OOMKilled", False)
    pending = {
        "metadata": {"name": "q"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}
            ],
        },
    }
    assert ServingPod.from_pod(pending).unschedulable == "no GPU"
