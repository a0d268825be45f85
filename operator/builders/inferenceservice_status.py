"""InferenceService status as a pure function of what the cluster shows: the Deployment and its
pods in, `status` (phase, conditions, counts, lastFailure) and the Events of the transitions out.

Phases (a level, recomputed every pass; unlike a job's, none is terminal: a fixed spec recovers):

    Pending       pods exist but none runs yet (scheduling, image pull) or none exists yet
    Loading       pods run but none passed its startup probe (the model is loading)
    Ready         at least one replica serves and nothing is failing (new replicas may be loading:
                  see the Progressing condition)
    Degraded      some replicas serve, others crash-loop, failed, or stopped passing readiness
    Failed        no replica serves and pods crash-loop / fail (see status.lastFailure)
    ScaledToZero  the Deployment has 0 replicas (spec.replicas 0, or autoscaling minReplicas 0)

Conditions: Ready (serving at all), Progressing (a rollout, a scale-up, loading or unschedulable
pods), Degraded, and ScaleToZero when minReplicas is 0 (says what a cold start means).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.inferenceservice import (
    AutoscalingStatus,
    InferenceServiceSpec,
    InferenceServiceStatus,
    ParallelStatus,
    ScaleEvent,
)
from lmforge.operator.builders.inferenceservice import CONTAINER_NAME, parallel_layout

# A Failed pod (eviction; kwok's lmforge.dev/fate) counts against the phase this long; it stays
# in lastFailure until a newer failure replaces it.
FAILURE_WINDOW = timedelta(minutes=5)
HISTORY_LENGTH = 10
BAD_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

# Condition types.
ConditionReady = "Ready"
ConditionProgressing = "Progressing"
ConditionDegraded = "Degraded"
ConditionScaleToZero = "ScaleToZero"

# Reasons (CamelCase, stable) and their messages.
ReasonReplicasReady = "ReplicasReady"
ReasonNoReplicas = "NoReplicaReady"
ReasonModelLoading = "ModelLoading"
ReasonPodsPending = "PodsPending"
ReasonReplicasFailing = "ReplicasFailing"
ReasonReplicasNotReady = "ReplicasNotReady"
ReasonScaledToZero = "ScaledToZero"
ReasonRollingUpdate = "RollingUpdate"
ReasonScalingDown = "ScalingDown"
ReasonUnschedulable = "Unschedulable"
ReasonSettled = "Settled"
ReasonHealthy = "AllReplicasHealthy"
ReasonColdStart = "ColdStartAfterIdle"
MessageColdStart = (
    "minReplicas is 0: after {idle}s without running or waiting requests the service scales to zero. "
    "The first request after that waits for a cold start (a new pod loads the model, up to {startup}s). "
    "lmforge has no activator yet to hold requests and wake the service: while at zero, requests are "
    "refused until `kubectl scale deployment/{name} --replicas 1` (the autoscaler goes on from the "
    "Deployment's size) or minReplicas >= 1 brings it back"
)
ReasonScaledUp = "ScaledUp"
ReasonScaledDown = "ScaledDown"
ReasonPodFailed = "PodFailed"

Phase = Literal["Pending", "Loading", "Ready", "Degraded", "ScaledToZero", "Failed"]


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class ServingPod:
    """What the status needs to know about one server pod."""

    name: str
    phase: str = "Running"  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    started: bool = False  # the startup probe passed (the model is loaded)
    ip: str | None = None
    node: str | None = None
    deleting: bool = False
    waiting_reason: str | None = None  # CrashLoopBackOff, ImagePullBackOff, ...
    waiting_message: str | None = None
    unschedulable: str | None = None  # the scheduler's message when it cannot place the pod
    exit_code: int | None = None  # the current (Failed pod) or last (restarted container) termination
    reason: str | None = None
    message: str | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> ServingPod:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        statuses = status.get("containerStatuses") or []
        main = next((s for s in statuses if s.get("name") == CONTAINER_NAME), statuses[0] if statuses else {})
        state, last = main.get("state") or {}, main.get("lastState") or {}
        terminated = state.get("terminated") or last.get("terminated") or {}
        waiting = state.get("waiting") or {}
        conditions = {cond.get("type"): cond for cond in status.get("conditions") or ()}
        scheduled = conditions.get("PodScheduled") or {}
        return cls(
            name=meta.get("name", ""),
            phase=status.get("phase") or "Pending",
            ready=(conditions.get("Ready") or {}).get("status") == "True",
            started=bool(main.get("started")),
            ip=status.get("podIP"),
            node=(pod.get("spec") or {}).get("nodeName"),
            deleting=bool(meta.get("deletionTimestamp")),
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
            unschedulable=scheduled.get("message") or "unschedulable"
            if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
            else None,
            exit_code=terminated.get("exitCode"),
            reason=terminated.get("reason") or status.get("reason"),
            message=terminated.get("message") or status.get("message"),
            finished_at=parse_time(terminated.get("finishedAt")),
        )

    @property
    def active(self) -> bool:
        """Counts as a replica: not terminating, not finished."""
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")

    @property
    def serving(self) -> bool:
        return self.active and self.ready

    @property
    def crash_looping(self) -> bool:
        return self.active and self.waiting_reason in BAD_WAITING_REASONS

    @property
    def loading(self) -> bool:
        """Running, the startup probe has not passed yet."""
        return self.active and self.phase == "Running" and not self.started and not self.crash_looping

    @property
    def fell_out(self) -> bool:
        """Was loaded (startup passed) and is now failing readiness."""
        return self.active and self.phase == "Running" and self.started and not self.ready

    def failed_recently(self, now: datetime) -> bool:
        return (
            not self.deleting
            and self.phase == "Failed"
            and (self.finished_at is None or now - self.finished_at <= FAILURE_WINDOW)
        )

    def failure(self, now: datetime) -> LastFailure | None:
        """This pod's failure, if it has one worth reporting."""
        if self.crash_looping:
            return LastFailure(
                pod=self.name,
                node=self.node,
                exit_code=self.exit_code,
                reason=self.waiting_reason,
                message=self.message or self.waiting_message,
                time=self.finished_at or now,
            )
        if self.phase == "Failed":
            return LastFailure(
                pod=self.name,
                node=self.node,
                exit_code=self.exit_code,
                reason=self.reason or "Failed",
                message=self.message,
                time=self.finished_at or now,
            )
        return None


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """The Deployment's own counts (apps/v1 status)."""

    replicas: int  # spec.replicas: the size the Deployment aims for
    generation: int = 0
    observed_generation: int = 0
    updated_replicas: int = 0
    ready_replicas: int = 0

    @classmethod
    def from_deployment(cls, obj: Mapping[str, Any]) -> DeploymentView:
        spec, status, meta = obj.get("spec") or {}, obj.get("status") or {}, obj.get("metadata") or {}
        return cls(
            replicas=int(spec.get("replicas", 1)),
            generation=int(meta.get("generation") or 0),
            observed_generation=int(status.get("observedGeneration") or 0),
            updated_replicas=int(status.get("updatedReplicas") or 0),
            ready_replicas=int(status.get("readyReplicas") or 0),
        )

    @property
    def rolling(self) -> bool:
        return self.observed_generation < self.generation or self.updated_replicas < self.replicas


@dataclass(frozen=True, slots=True)
class StatusEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Reflection:
    status: InferenceServiceStatus
    events: tuple[StatusEvent, ...] = ()


def _failure_key(failure: LastFailure) -> tuple:
    """Same pod, same way: one Event, however often a crash-looping container restarts."""
    return failure.pod, failure.reason, failure.exit_code, failure.message


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Replace (or add) condition `type_`; lastTransitionTime moves only when `status` changes."""
    old = next((cond for cond in conditions if cond.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [cond for cond in conditions if cond.type != type_] + [new]


def _names(pods: Sequence[ServingPod], limit: int = 3) -> str:
    names = [p.name for p in pods[:limit]]
    return ", ".join(names) + (f" and {len(pods) - limit} more" if len(pods) > limit else "")


def reflect(
    name: str,
    spec: InferenceServiceSpec,
    previous: InferenceServiceStatus,
    deployment: DeploymentView | None,
    pods: Sequence[ServingPod],
    now: datetime,
) -> Reflection:
    """The new status (autoscaling, history, url, selector and observedGeneration carried over)
    and the Events for what changed since `previous`."""
    desired = deployment.replicas if deployment is not None else None
    active = [p for p in pods if p.active]
    serving = [p for p in active if p.serving]
    failing = [p for p in active if p.crash_looping] + [p for p in pods if p.failed_recently(now)]
    fell_out = [p for p in active if p.fell_out]
    loading = [p for p in active if p.loading]
    pending = [p for p in active if p.phase == "Pending"]
    unschedulable = [p for p in pending if p.unschedulable]
    ready = len(serving)

    if desired == 0:
        phase: Phase = "ScaledToZero"
    elif ready == 0:
        phase = "Failed" if failing else "Loading" if any(p.phase == "Running" for p in active) else "Pending"
    else:
        phase = "Degraded" if failing or fell_out else "Ready"

    gen = previous.observed_generation
    conditions = list(previous.conditions)
    want = desired if desired is not None else 0
    if ready:
        conditions = set_condition(
            conditions,
            ConditionReady,
            "True",
            ReasonReplicasReady,
            f"{ready}/{want} replicas ready",
            now,
            gen,
        )
    else:
        reason, message = {
            "ScaledToZero": (ReasonScaledToZero, "no replicas: the Deployment is scaled to 0"),
            "Failed": (ReasonReplicasFailing, f"no replica ready; failing: {_names(failing)}"),
            "Loading": (ReasonModelLoading, f"{len(loading)} replica(s) loading the model"),
        }.get(
            phase,
            (
                ReasonPodsPending,
                "waiting for pods to be scheduled and started"
                if deployment is not None
                else "waiting for the Deployment",
            ),
        )
        conditions = set_condition(conditions, ConditionReady, "False", reason, message, now, gen)

    if deployment is not None and deployment.rolling:
        progressing = (ReasonRollingUpdate, f"{deployment.updated_replicas}/{want} replicas updated")
    elif unschedulable:
        progressing = (
            ReasonUnschedulable,
            f"{len(unschedulable)} replica(s) cannot be scheduled: {unschedulable[0].unschedulable}",
        )
    elif len(active) > want:
        progressing = (ReasonScalingDown, f"{len(active)} replicas, scaling down to {want}")
    elif ready < want and (loading or pending or len(active) < want):
        progressing = (
            ReasonModelLoading if loading else ReasonPodsPending,
            f"{ready}/{want} replicas ready, {len(loading)} loading, {len(pending)} pending",
        )
    else:
        progressing = None
    if progressing:
        conditions = set_condition(conditions, ConditionProgressing, "True", *progressing, now, gen)
    elif ready < want:  # nothing on its way: the missing replicas fail or fell out of readiness
        conditions = set_condition(
            conditions,
            ConditionProgressing,
            "False",
            ReasonReplicasFailing if failing else ReasonReplicasNotReady,
            f"{ready}/{want} replicas ready and none on its way",
            now,
            gen,
        )
    else:
        conditions = set_condition(
            conditions,
            ConditionProgressing,
            "False",
            ReasonSettled,
            f"{ready} replica(s) ready, nothing in progress",
            now,
            gen,
        )

    if failing:
        conditions = set_condition(
            conditions,
            ConditionDegraded,
            "True",
            ReasonReplicasFailing,
            f"failing: {_names(failing)}",
            now,
            gen,
        )
    elif fell_out:
        conditions = set_condition(
            conditions,
            ConditionDegraded,
            "True",
            ReasonReplicasNotReady,
            f"not passing readiness: {_names(fell_out)}",
            now,
            gen,
        )
    else:
        conditions = set_condition(
            conditions, ConditionDegraded, "False", ReasonHealthy, "no replica is failing", now, gen
        )

    autoscaling = spec.autoscaling
    if autoscaling is not None and autoscaling.min_replicas == 0:
        conditions = set_condition(
            conditions,
            ConditionScaleToZero,
            "True",
            ReasonColdStart,
            MessageColdStart.format(
                idle=autoscaling.scale_down_stabilization_seconds,
                startup=spec.startup_timeout_seconds,
                name=name,
            ),
            now,
            gen,
        )
    else:
        conditions = [cond for cond in conditions if cond.type != ConditionScaleToZero]

    events: list[StatusEvent] = []
    last_failure = previous.last_failure
    failures = [f for f in (p.failure(now) for p in pods) if f is not None]
    newest = max(failures, key=lambda f: f.time, default=None)
    if newest is not None and (last_failure is None or _failure_key(newest) != _failure_key(last_failure)):
        detail = ", ".join(
            x
            for x in (
                newest.reason,
                None if newest.exit_code is None else f"exit code {newest.exit_code}",
                newest.message,
            )
            if x
        )
        events.append(StatusEvent("Warning", ReasonPodFailed, f"pod {newest.pod} failed: {detail}"))
        last_failure = newest

    status = previous.model_copy(
        update={
            "phase": phase,
            "conditions": conditions,
            "replicas": len(active),
            "ready_replicas": ready,
            "last_failure": last_failure,
            "parallelism": ParallelStatus.model_validate(parallel_layout(spec, want)),
        }
    )
    if phase != previous.phase:
        events.append(_phase_event(phase, ready, want, status))
    return Reflection(status=status, events=tuple(events))


def _phase_event(phase: Phase, ready: int, want: int, status: InferenceServiceStatus) -> StatusEvent:
    if phase == "Ready":
        return StatusEvent("Normal", "Ready", f"{ready}/{want} replicas ready at {status.url}")
    if phase == "Loading":
        return StatusEvent("Normal", ReasonModelLoading, "replicas are loading the model")
    if phase == "Pending":
        return StatusEvent("Normal", ReasonPodsPending, "waiting for pods to be scheduled and started")
    if phase == "ScaledToZero":
        return StatusEvent("Normal", ReasonScaledToZero, "no replicas")
    failure = status.last_failure
    detail = f" (last failure: pod {failure.pod}, {failure.reason})" if failure else ""
    if phase == "Degraded":
        return StatusEvent("Warning", "Degraded", f"{ready}/{want} replicas ready{detail}")
    return StatusEvent("Warning", "Failed", f"no replica can serve{detail}")


def record_autoscaling(
    status: InferenceServiceStatus,
    *,
    desired: int,
    metric_value: float | None,
    reason: str,
    scaled_from: int | None = None,
    scaled_to: int | None = None,
    now: datetime,
) -> tuple[InferenceServiceStatus, StatusEvent | None]:
    """Fold one autoscaler decision into the status; a change of replicas also goes into
    `history` (the last HISTORY_LENGTH, newest last) and returns its Event."""
    previous = status.autoscaling or AutoscalingStatus()
    changed = scaled_from is not None and scaled_to is not None and scaled_from != scaled_to
    autoscaling = AutoscalingStatus(
        desired_replicas=desired,
        current_metric_value=None if metric_value is None else round(metric_value, 4),
        last_scale_time=now if changed else previous.last_scale_time,
        last_decision=reason,
    )
    if not changed:
        return status.model_copy(update={"autoscaling": autoscaling}), None
    entry = ScaleEvent(time=now, from_replicas=scaled_from, to_replicas=scaled_to, reason=reason)
    history = [*status.history, entry][-HISTORY_LENGTH:]
    event = StatusEvent("Normal", ReasonScaledUp if scaled_to > scaled_from else ReasonScaledDown, reason)
    return status.model_copy(update={"autoscaling": autoscaling, "history": history}), event
