"""InferenceService `decide`: the Deployment, pods and this process's memory in, status + Events +
actions out (no cluster). Table-driven: each case names what it pins."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from lmforge.operator import autoscaler
from lmforge.operator.api.base import Condition
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders.inferenceservice_policy import AUTOSCALER_MANAGER, Observed, decide
from lmforge.operator.builders.inferenceservice_status import DeploymentView, ServingPod
from lmforge.operator.decision import Apply, Delete, Event, Scale

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
NS = "team-a"


def spec(**overrides: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"source": "pvc://models/llama"}, **overrides})


def observed(**fields: Any) -> Observed:
    base: dict[str, Any] = {
        "name": "chat",
        "namespace": NS,
        "uid": "uid-1",
        "generation": 2,
        "spec": spec(replicas=2),
        "status": InferenceServiceStatus(observed_generation=2),
        "deployment": DeploymentView(replicas=2, generation=1, observed_generation=1, updated_replicas=2),
        "pods": (
            ServingPod("chat-a", ready=True, started=True),
            ServingPod("chat-b", ready=True, started=True),
        ),
        "now": NOW,
        "current": 2,
    }
    return Observed(**{**base, **fields})


def kinds(actions: tuple) -> list[tuple[str, ...]]:
    """Actions as (type, kind or object kind, replicas where it has one) for table comparison."""
    out = []
    for a in actions:
        if isinstance(a, Apply):
            out.append(("Apply", a.obj["kind"], str(a.obj.get("spec", {}).get("replicas", ""))))
        elif isinstance(a, Scale):
            out.append(("Scale", a.kind, str(a.replicas), a.field_manager))
        elif isinstance(a, Delete):
            out.append(("Delete", a.kind))
    return out


@pytest.mark.parametrize(
    "fields, actions, applies",
    [
        pytest.param(
            {"applied": False, "current": None, "deployment": None, "replicas_changed": True},
            [("Apply", "Deployment", "2"), ("Apply", "Service", ""), ("Apply", "PodDisruptionBudget", "")],
            2,
            id="new-generation-applies-at-spec-replicas",
        ),
        pytest.param(
            {"applied": False, "spec": spec(replicas=3)},
            [("Apply", "Deployment", "3"), ("Apply", "Service", ""), ("Apply", "PodDisruptionBudget", "")],
            2,
            id="three-replicas",
        ),
        pytest.param(
            {"applied": False, "spec": spec(autoscaling={"minReplicas": 1, "maxReplicas": 6}), "current": 4},
            [("Apply", "Deployment", "4"), ("Apply", "Service", ""), ("Apply", "PodDisruptionBudget", "")],
            2,
            id="resume-keeps-the-autoscaled-size",
        ),
        pytest.param(
            {"applied": False, "spec": spec(replicas=1)},
            [("Apply", "Deployment", "1"), ("Apply", "Service", ""), ("Delete", "PodDisruptionBudget")],
            2,
            id="one-replica-no-pdb",
        ),
        pytest.param({}, [], None, id="steady-state-does-nothing"),
        pytest.param(
            {"reapply_due": True},
            [("Apply", "Deployment", "2"), ("Apply", "Service", ""), ("Apply", "PodDisruptionBudget", "")],
            None,
            id="reapply-puts-back-drift",
        ),
        pytest.param(
            {"current": 5, "deployment": DeploymentView(replicas=5)},
            [("Scale", "Deployment", "2", "lmforge-operator")],
            None,
            id="kubectl-scaled-deployment-is-restored",
        ),
    ],
)
def test_actions(fields: dict[str, Any], actions: list, applies: int | None) -> None:
    decision = decide(observed(**fields))
    assert kinds(decision.actions) == actions
    assert decision.applies_generation == applies


def test_not_applied_writes_nothing_yet() -> None:
    """observedGeneration moves only on the pass after the apply went through."""
    status = InferenceServiceStatus(observed_generation=1)
    decision = decide(observed(applied=False, status=status))
    assert decision.status == status and decision.events == ()


def test_applied_generation_moves_observed_generation_with_one_event() -> None:
    decision = decide(observed(status=InferenceServiceStatus(observed_generation=1), applied_replicas=2))
    assert decision.status.observed_generation == 2 and decision.status.url and decision.status.selector
    assert decision.events[0] == Event(
        "Normal",
        "Applied",
        "applied Deployment, Service and PodDisruptionBudget for generation 2 (2 replica(s))",
    )
    again = decide(observed(status=decision.status))  # same generation (e.g. after a restart): quiet
    assert not any(e.reason == "Applied" for e in again.events)


def test_restore_event_names_both_sizes() -> None:
    decision = decide(observed(current=5, deployment=DeploymentView(replicas=5)))
    restored = next(e for e in decision.events if e.reason == "ReplicasRestored")
    assert "had 5 replica(s): back to spec.replicas 2" in restored.message


def test_invalid_spec_failed_is_terminal() -> None:
    """Failed with condition Failed=True (InvalidSpec) never changes: no apply, no scale, no write."""
    failed = InferenceServiceStatus(
        phase="Failed",
        conditions=[
            Condition(
                type="Failed", status="True", reason="InvalidSpec", message="x", last_transition_time=NOW
            )
        ],
    )
    decision = decide(
        observed(status=failed, applied=False, current=5, deployment=DeploymentView(replicas=5))
    )
    assert decision.status == failed and decision.actions == () and decision.requeue_after is None


def test_failing_replicas_are_a_level_not_terminal() -> None:
    """Phase Failed from crash-looping pods (no Failed condition) recovers when the pods do."""
    crashing = ServingPod("chat-a", waiting_reason="CrashLoopBackOff")
    failed = decide(observed(pods=(crashing,))).status
    assert failed.phase == "Failed"
    healthy = (ServingPod("chat-a", ready=True, started=True), ServingPod("chat-b", ready=True, started=True))
    assert decide(observed(status=failed, pods=healthy)).status.phase == "Ready"


def test_autoscaler_scales_on_a_scraped_pass_only() -> None:
    policy = {"minReplicas": 1, "maxReplicas": 4, "target": 4, "scaleUpStabilizationSeconds": 0}
    busy = {f"chat-{i}": autoscaler.PodSample(waiting=12.0) for i in range(1)}
    history = (
        autoscaler.Scrape(time=NOW.replace(second=0), replicas=1, pods=busy),
        autoscaler.Scrape(time=NOW, replicas=1, pods=busy),
    )
    fields = {"spec": spec(autoscaling=policy), "current": 1, "deployment": DeploymentView(replicas=1)}
    assert decide(observed(history=history, scraped=False, **fields)).actions == ()
    decision = decide(observed(history=history, scraped=True, **fields))
    assert kinds(decision.actions) == [("Scale", "Deployment", "3", AUTOSCALER_MANAGER)]
    assert decision.status.autoscaling is not None and decision.status.autoscaling.desired_replicas == 3
    assert [e.reason for e in decision.events if e.reason.startswith("Scaled")] == ["ScaledUp"]
    assert [(h.from_replicas, h.to_replicas) for h in decision.status.history] == [(1, 3)]
