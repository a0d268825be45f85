"""Factories for TrainJob tests (JobSet's pkg/util/testing/wrappers.go, in Python): a valid spec,
worker pods in any state, an `Observed` snapshot, each overridable by keyword, and readers of a
Decision's actions (which ranks it creates, which pods it deletes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from lmforge.operator.api import constants as c
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders.trainjob import JobRef, pod_name
from lmforge.operator.builders.trainjob_pods import WorkerPod
from lmforge.operator.builders.trainjob_policy import Observed
from lmforge.operator.decision import Create, Decision, Delete

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
JOB = JobRef(name="llama", namespace="team-a", uid="0000-1111")


def at(seconds: float) -> datetime:
    """T0 + seconds."""
    return T0 + timedelta(seconds=seconds)


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """A minimal valid TrainJob spec as a user writes it (camelCase)."""
    base: dict[str, Any] = {
        "model": "pvc://models/llama-3.2-1b",
        "dataset": {"source": "pvc://data/chat.jsonl"},
        "output": {"dir": "pvc://out/llama-lora"},
    }
    return {**base, **overrides}


def make_spec(**overrides: Any) -> TrainJobSpec:
    return TrainJobSpec.model_validate(spec_dict(**overrides))


def worker(
    rank: int, attempt: int = 0, phase: str = "Running", job: str = JOB.name, **fields: Any
) -> WorkerPod:
    return WorkerPod(
        name=pod_name(job, rank), rank=rank, attempt=attempt, phase=phase, ready=phase == "Running", **fields
    )


def workers(num: int, attempt: int = 0, phase: str = "Running", **fields: Any) -> list[WorkerPod]:
    return [worker(rank, attempt, phase, **fields) for rank in range(num)]


def status(**fields: Any) -> TrainJobStatus:
    return TrainJobStatus(**fields)


def observed(
    spec: TrainJobSpec | None = None,
    status: TrainJobStatus | None = None,
    pods: list[WorkerPod] | tuple[WorkerPod, ...] = (),
    now: datetime = T0,
    generation: int = 1,
    spec_hash: str | None = None,
) -> Observed:
    return Observed(
        name=JOB.name,
        generation=generation,
        spec=spec or make_spec(num_nodes=4),
        status=status or TrainJobStatus(),
        pods=tuple(pods),
        now=now,
        spec_hash=spec_hash,
        namespace=JOB.namespace,
        uid=JOB.uid,
    )


def pod_dict(
    rank: int,
    attempt: int = 0,
    phase: str = "Running",
    exit_code: int | None = None,
    annotations: dict[str, str] | None = None,
    deletion_timestamp: str | None = None,
    node: str | None = "kwok-node-0",
    job: str = JOB.name,
) -> dict[str, Any]:
    """A worker pod as the API server returns it (only the fields the policy reads)."""
    meta: dict[str, Any] = {
        "name": pod_name(job, rank),
        "namespace": JOB.namespace,
        "labels": {
            "lmforge.dev/job-name": job,
            "lmforge.dev/rank": str(rank),
            "lmforge.dev/restart": str(attempt),
        },
    }
    if annotations:
        meta["annotations"] = annotations
    if deletion_timestamp:
        meta["deletionTimestamp"] = deletion_timestamp
    state: dict[str, Any] = {"running": {"startedAt": "2025-01-01T12:00:00Z"}}
    if exit_code is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "finishedAt": "2025-01-01T12:05:00Z",
            }
        }
    return {
        "metadata": meta,
        "spec": {"nodeName": node},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


# --- reading a Decision's actions back as the policy's intents ---------------------------------------


def created_ranks(decision: Decision[Any]) -> tuple[int, ...]:
    """The ranks whose worker pods the decision creates, in order."""
    return tuple(
        int(a.obj["metadata"]["labels"][c.LABEL_RANK])
        for a in decision.actions
        if isinstance(a, Create) and a.obj.get("kind") == "Pod"
    )


def deleted_pods(decision: Decision[Any]) -> tuple[str, ...]:
    """Pods deleted with their grace period."""
    return tuple(
        a.name
        for a in decision.actions
        if isinstance(a, Delete) and a.kind == "Pod" and a.grace_period_seconds is None
    )


def force_deleted_pods(decision: Decision[Any]) -> tuple[str, ...]:
    """Pods deleted at once (grace 0)."""
    return tuple(
        a.name
        for a in decision.actions
        if isinstance(a, Delete) and a.kind == "Pod" and a.grace_period_seconds == 0
    )


def deletes_job(decision: Decision[Any]) -> bool:
    return any(isinstance(a, Delete) and a.kind == "TrainJob" for a in decision.actions)
