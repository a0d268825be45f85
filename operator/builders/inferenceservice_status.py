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

from lmforge.operator import clock
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.inferenceservice import (
    AutoscalingStatus,
    InferenceServiceSpec,
    InferenceServiceStatus,
    ParallelStatus,
    ScaleEvent,
)
from lmforge.operator.builders.conditions import set_condition
from lmforge.operator.builders.inferenceservice import CONTAINER_NAME, parallel_layout
from lmforge.operator.decision import Event

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

Phase = Literal["Pending", "Loading", "Ready", "Degraded", "ScaledToZero", "Failed"]


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
            finished_at=clock.parse_time(terminated.get("finishedAt")),
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
class Reflection:
    status: InferenceServiceStatus
    events: tuple[Event, ...] = ()


def _failure_key(failure: LastFailure) -> tuple:
    """Same pod, same way: one Event, however often a crash-looping container restarts."""
    return failure.pod, failure.reason, failure.exit_code, failure.message


def _names(pods: Sequence[ServingPod], limit: int = 3) -> str:
    names = [p.name for p in pods[:limit]]
    return ", ".join(names) + (f" and {len(pods) - limit} more" if len(pods) > limit else "")


@dataclass(frozen=True, slots=True)
class _Pods:
    """The service's pods sorted by what they are doing, once per `reflect`."""

    active: list[ServingPod]
    serving: list[ServingPod]
    failing: list[ServingPod]
    fell_out: list[ServingPod]
    loading: list[ServingPod]
    pending: list[ServingPod]

    @classmethod
    def sort(cls, pods: Sequence[ServingPod], now: datetime) -> _Pods:
        active = [p for p in pods if p.active]
        return cls(
            active=active,
            serving=[p for p in active if p.serving],
            failing=[p for p in active if p.crash_looping] + [p for p in pods if p.failed_recently(now)],
            fell_out=[p for p in active if p.fell_out],
            loading=[p for p in active if p.loading],
            pending=[p for p in active if p.phase == "Pending"],
        )

    @property
    def unschedulable(self) -> list[ServingPod]:
        return [p for p in self.pending if p.unschedulable]


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
    sorted_pods = _Pods.sort(pods, now)
    want = deployment.replicas if deployment is not None else 0
    phase = _phase(deployment, sorted_pods)
    gen = previous.observed_generation
    conditions = list(previous.conditions)
    for type_, status_, reason, message in (
        (r.ConditionReady, *_ready(phase, deployment, sorted_pods, want)),
        (r.ConditionProgressing, *_progressing(deployment, sorted_pods, want)),
        (r.ConditionDegraded, *_degraded(sorted_pods)),
    ):
        conditions = set_condition(conditions, type_, status_, reason, message, now, gen)
    conditions = _scale_to_zero(name, spec, conditions, now, gen)
    last_failure, failure_events = _newest_failure(previous.last_failure, pods, now)
    status = previous.model_copy(
        update={
            "phase": phase,
            "conditions": conditions,
            "replicas": len(sorted_pods.active),
            "ready_replicas": len(sorted_pods.serving),
            "last_failure": last_failure,
            "parallelism": ParallelStatus.model_validate(parallel_layout(spec, want)),
        }
    )
    events = list(failure_events)
    if phase != previous.phase:
        events.append(_phase_event(phase, len(sorted_pods.serving), want, status))
    return Reflection(status=status, events=tuple(events))


def _phase(deployment: DeploymentView | None, pods: _Pods) -> Phase:
    if deployment is not None and deployment.replicas == 0:
        return "ScaledToZero"
    if not pods.serving:
        if pods.failing:
            return "Failed"
        return "Loading" if any(p.phase == "Running" for p in pods.active) else "Pending"
    return "Degraded" if pods.failing or pods.fell_out else "Ready"


def _ready(phase: Phase, deployment: DeploymentView | None, pods: _Pods, want: int) -> tuple[bool, str, str]:
    ready = len(pods.serving)
    if ready:
        return True, r.ReasonReplicasReady, f"{ready}/{want} replicas ready"
    if phase == "ScaledToZero":
        return False, r.ReasonScaledToZero, "no replicas: the Deployment is scaled to 0"
    if phase == "Failed":
        return False, r.ReasonReplicasFailing, f"no replica ready; failing: {_names(pods.failing)}"
    if phase == "Loading":
        return False, r.ReasonModelLoading, f"{len(pods.loading)} replica(s) loading the model"
    waiting = (
        "waiting for pods to be scheduled and started"
        if deployment is not None
        else "waiting for the Deployment"
    )
    return False, r.ReasonPodsPending, waiting


def _progressing(deployment: DeploymentView | None, pods: _Pods, want: int) -> tuple[bool, str, str]:
    """True with what is on its way (a rollout, unschedulable pods, a scale-down, loading or
    pending replicas); False when nothing is, saying whether replicas are missing."""
    ready, active, unschedulable = len(pods.serving), len(pods.active), pods.unschedulable
    if deployment is not None and deployment.rolling:
        return True, r.ReasonRollingUpdate, f"{deployment.updated_replicas}/{want} replicas updated"
    if unschedulable:
        message = f"{len(unschedulable)} replica(s) cannot be scheduled: {unschedulable[0].unschedulable}"
        return True, r.ReasonUnschedulable, message
    if active > want:
        return True, r.ReasonScalingDown, f"{active} replicas, scaling down to {want}"
    if ready < want and (pods.loading or pods.pending or active < want):
        reason = r.ReasonModelLoading if pods.loading else r.ReasonPodsPending
        return (
            True,
            reason,
            f"{ready}/{want} replicas ready, {len(pods.loading)} loading, {len(pods.pending)} pending",
        )
    if ready < want:  # nothing on its way: the missing replicas fail or fell out of readiness
        reason = r.ReasonReplicasFailing if pods.failing else r.ReasonReplicasNotReady
        return False, reason, f"{ready}/{want} replicas ready and none on its way"
    return False, r.ReasonSettled, f"{ready} replica(s) ready, nothing in progress"


def _degraded(pods: _Pods) -> tuple[bool, str, str]:
    if pods.failing:
        return True, r.ReasonReplicasFailing, f"failing: {_names(pods.failing)}"
    if pods.fell_out:
        return True, r.ReasonReplicasNotReady, f"not passing readiness: {_names(pods.fell_out)}"
    return False, r.ReasonHealthy, "no replica is failing"


def _scale_to_zero(
    name: str, spec: InferenceServiceSpec, conditions: list[Condition], now: datetime, gen: int | None
) -> list[Condition]:
    """ScaleToZero says what a cold start means, only while minReplicas is 0."""
    autoscaling = spec.autoscaling
    if autoscaling is None or autoscaling.min_replicas != 0:
        return [cond for cond in conditions if cond.type != r.ConditionScaleToZero]
    message = r.MessageColdStart.format(
        idle=autoscaling.scale_down_stabilization_seconds, startup=spec.startup_timeout_seconds, name=name
    )
    return set_condition(conditions, r.ConditionScaleToZero, True, r.ReasonColdStart, message, now, gen)


def _newest_failure(
    last_failure: LastFailure | None, pods: Sequence[ServingPod], now: datetime
) -> tuple[LastFailure | None, tuple[Event, ...]]:
    """status.lastFailure and one PodFailed Event when a pod failed in a new way."""
    failures = [f for f in (p.failure(now) for p in pods) if f is not None]
    newest = max(failures, key=lambda f: f.time or now, default=None)
    if newest is None or (last_failure is not None and _failure_key(newest) == _failure_key(last_failure)):
        return last_failure, ()
    exit_code = None if newest.exit_code is None else f"exit code {newest.exit_code}"
    detail = ", ".join(x for x in (newest.reason, exit_code, newest.message) if x)
    return newest, (Event("Warning", r.ReasonPodFailed, f"pod {newest.pod} failed: {detail}"),)


def _phase_event(phase: Phase, ready: int, want: int, status: InferenceServiceStatus) -> Event:
    if phase == "Ready":
        return Event("Normal", r.ReasonReady, f"{ready}/{want} replicas ready at {status.url}")
    if phase == "Loading":
        return Event("Normal", r.ReasonModelLoading, "replicas are loading the model")
    if phase == "Pending":
        return Event("Normal", r.ReasonPodsPending, "waiting for pods to be scheduled and started")
    if phase == "ScaledToZero":
        return Event("Normal", r.ReasonScaledToZero, "no replicas")
    failure = status.last_failure
    detail = f" (last failure: pod {failure.pod}, {failure.reason})" if failure else ""
    if phase == "Degraded":
        return Event("Warning", r.ReasonDegraded, f"{ready}/{want} replicas ready{detail}")
    return Event("Warning", r.ReasonFailed, f"no replica can serve{detail}")


def record_autoscaling(
    status: InferenceServiceStatus,
    *,
    desired: int,
    metric_value: float | None,
    reason: str,
    scaled_from: int | None = None,
    scaled_to: int | None = None,
    now: datetime,
) -> tuple[InferenceServiceStatus, Event | None]:
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
    if scaled_from is None or scaled_to is None or not changed:
        return status.model_copy(update={"autoscaling": autoscaling}), None
    entry = ScaleEvent(time=now, from_replicas=scaled_from, to_replicas=scaled_to, reason=reason)
    history = [*status.history, entry][-HISTORY_LENGTH:]
    event = Event("Normal", r.ReasonScaledUp if scaled_to > scaled_from else r.ReasonScaledDown, reason)
    return status.model_copy(update={"autoscaling": autoscaling, "history": history}), event
