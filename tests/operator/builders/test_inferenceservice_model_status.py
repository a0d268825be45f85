"""status.model and storage-initializer failures through the InferenceService's pure `decide`:
pod objects as the API server shows them (ServingPod.from_pod, what the controller's index keeps)
in, status out. Table-driven: each case names what it pins."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from lmforge.operator.api import reasons as r
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders.inferenceservice_policy import Observed, decide
from lmforge.operator.builders.inferenceservice_status import DeploymentView, ServingPod

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
SOURCE = "s3://models/tiny"
MISSING = "lmforge fetch: s3://models/tiny: no object under the prefix (bucket 'models')"


def pod(
    name: str,
    created: str,
    report: dict[str, Any] | None = None,
    *,
    ready: bool = True,
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    annotations = {"lmforge.dev/fetch": json.dumps(report)} if report is not None else {}
    server: dict[str, Any] = {"name": "server", "started": ready, "state": {"running": {}}}
    status: dict[str, Any] = {
        "phase": "Running" if ready else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [server],
    }
    if init is not None:
        status["initContainerStatuses"] = [{"name": "storage-initializer", **init}]
        server["state"] = {"waiting": {"reason": "PodInitializing"}}
    return {
        "metadata": {"name": name, "creationTimestamp": created, "annotations": annotations},
        "spec": {"nodeName": "node-1"},
        "status": status,
    }


def done(cached: bool, nbytes: int, uri: str = SOURCE) -> dict[str, Any]:
    return {"uri": uri, "phase": "Done", "cached": cached, "bytes": nbytes, "revision": "etag-1"}


CRASH_LOOP = {
    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
    "lastState": {
        "terminated": {
            "exitCode": 1,
            "reason": "Error",
            "message": MISSING,
            "finishedAt": "2025-01-01T11:59:50Z",
        }
    },
}


def observe(source: str, *pods: dict[str, Any]) -> Observed:
    spec = InferenceServiceSpec.model_validate({"model": {"source": source}, "replicas": len(pods)})
    return Observed(
        name="chat",
        namespace="team-a",
        uid="uid-1",
        generation=1,
        spec=spec,
        status=InferenceServiceStatus(observed_generation=1),
        deployment=DeploymentView(
            replicas=len(pods), generation=1, observed_generation=1, updated_replicas=len(pods)
        ),
        pods=tuple(ServingPod.from_pod(p) for p in pods),
        now=NOW,
        current=len(pods),
    )


@pytest.mark.parametrize(
    "source, pods, model",
    [
        pytest.param("pvc://models/tiny", [pod("a", "t1")], None, id="local-model-has-no-status-model"),
        pytest.param(
            SOURCE,
            [pod("a", "2025-01-01T11:00:00Z", done(False, 4096))],
            {
                "source": SOURCE,
                "revision": "etag-1",
                "cached": False,
                "cachedReplicas": 0,
                "downloading": 0,
                "bytes": 4096,
            },
            id="first-replica-downloaded-cold",
        ),
        pytest.param(
            SOURCE,
            [
                pod("a", "2025-01-01T11:00:00Z", done(False, 4096)),
                pod("b", "2025-01-01T11:05:00Z", done(True, 0)),
            ],
            {
                "source": SOURCE,
                "revision": "etag-1",
                "cached": True,
                "cachedReplicas": 1,
                "downloading": 0,
                "bytes": 0,
            },
            id="second-replica-started-warm-from-the-node-cache",
        ),
        pytest.param(
            SOURCE,
            [
                pod("a", "2025-01-01T11:00:00Z", done(False, 4096)),
                pod(
                    "b",
                    "2025-01-01T11:05:00Z",
                    {
                        "uri": SOURCE,
                        "phase": "Downloading",
                        "bytes": 100,
                        "totalBytes": 4096,
                        "etaSeconds": 7,
                    },
                    ready=False,
                ),
            ],
            {
                "source": SOURCE,
                "revision": "etag-1",
                "cached": False,
                "cachedReplicas": 0,
                "downloading": 1,
                "bytes": 100,
                "totalBytes": 4096,
                "etaSeconds": 7,
            },
            id="a-replica-still-downloading",
        ),
        pytest.param(
            SOURCE,
            [pod("a", "2025-01-01T11:00:00Z", done(True, 0, uri="s3://models/old"))],
            {"source": SOURCE, "downloading": 0},
            id="a-report-for-another-uri-does-not-count",
        ),
    ],
)
def test_status_model_is_filled_from_the_pods_fetch_reports(
    source: str, pods: list[dict[str, Any]], model: dict[str, Any] | None
) -> None:
    status = decide(observe(source, *pods)).status
    got = status.model.model_dump(by_alias=True, exclude_none=True) if status.model else None
    assert got == model


def ready_condition(status: InferenceServiceStatus) -> tuple[str, str, str]:
    [cond] = [c for c in status.conditions if c.type == r.ConditionReady]
    return cond.status, cond.reason, cond.message


@pytest.mark.parametrize(
    "pods, phase, ready_reason, last_failure",
    [
        pytest.param(
            [pod("a", "t1", ready=False, init=CRASH_LOOP)],
            "Failed",
            r.ReasonStorageInitializerFailed,
            ("a", 1, "CrashLoopBackOff", f"storage-initializer: {MISSING}"),
            id="missing-key-fails-the-service-naming-the-uri",
        ),
        pytest.param(
            [pod("a", "t1", done(False, 4096)), pod("b", "t2", ready=False, init=CRASH_LOOP)],
            "Degraded",
            r.ReasonReplicasReady,
            ("b", 1, "CrashLoopBackOff", f"storage-initializer: {MISSING}"),
            id="one-replica-serves-the-other-cannot-fetch",
        ),
        pytest.param(
            [pod("a", "t1", ready=False, init={"state": {"running": {}}})],
            "Pending",
            r.ReasonPodsPending,
            None,
            id="a-running-initializer-is-not-a-failure",
        ),
        pytest.param(
            [pod("a", "t1", done(False, 4096), init={"state": {"terminated": {"exitCode": 0}}})],
            "Ready",
            r.ReasonReplicasReady,
            None,
            id="a-finished-initializer-is-not-a-failure",
        ),
    ],
)
def test_a_failing_storage_initializer_shows_in_the_service_status(
    pods: list[dict[str, Any]], phase: str, ready_reason: str, last_failure: tuple | None
) -> None:
    decision = decide(observe(SOURCE, *pods))
    status = decision.status
    assert status.phase == phase
    assert ready_condition(status)[1] == ready_reason
    failure = status.last_failure
    got = None if failure is None else (failure.pod, failure.exit_code, failure.reason, failure.message)
    assert got == last_failure
    if failure is not None:
        assert SOURCE in failure.message
        assert any(e.reason == r.ReasonPodFailed and SOURCE in e.message for e in decision.events)
    if phase == "Failed":
        assert SOURCE in ready_condition(status)[2]
