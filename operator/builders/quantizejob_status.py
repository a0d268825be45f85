"""QuantizeJob status as a pure function of what the cluster shows: the Job and its pod in, the new
status, the Events of the transitions and what to do (create the Job, serve the output) out.

    Pending    the Job is created; its pod is not running yet (scheduling, image pull)
    Running    the pod runs `lmforge quantize`
    Succeeded  the pod exited 0; status.result holds its report (the lmforge.dev/result annotation)
    Failed     the pod failed (status.lastFailure: exit code, the runtime's termination message), the Job
               failed (activeDeadlineSeconds), the Job vanished before finishing, or the spec is invalid

Succeeded and Failed are terminal: once written, the phase never changes. After Succeeded, a
serveAfter InferenceService is applied until status.inferenceService names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from lmforge.operator.api.base import LastFailure
from lmforge.operator.api.constants import (
    TERMINAL_PHASES,
    ConditionCreated,
    ConditionFailed,
    ConditionRunning,
    ConditionSucceeded,
    PhaseFailed,
    PhasePending,
    PhaseRunning,
    PhaseSucceeded,
)
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus, QuantizeResult
from lmforge.operator.builders.quantizejob import ANNOTATION_RESULT, CONTAINER_NAME
from lmforge.operator.builders.trainjob_policy import parse_time, set_condition

# A Job we created but cannot see (yet) is given this long before the job counts as failed:
# the watch that feeds the index may lag behind our own create.
JOB_GONE_GRACE = timedelta(seconds=60)
MAX_MESSAGE = 1024

# Reason / Message pairs (JobSet style: the reason is stable CamelCase, the message for humans).
ReasonJobCreated = "JobCreated"
MessageJobCreated = "created Job {job}: one pod runs `lmforge quantize --method {method}`"
ReasonPodPending = "PodPending"
MessagePodPending = "waiting for the quantization pod to start{detail}"
ReasonPodRunning = "PodRunning"
MessagePodRunning = "pod {pod} is quantizing ({method})"
ReasonQuantized = "QuantizationSucceeded"
MessageQuantized = "wrote {output}{summary}"
ReasonPodFailed = "PodFailed"
MessagePodFailed = "pod {pod} failed ({detail}){message}"
ReasonDeadlineExceeded = "DeadlineExceeded"
MessageDeadlineExceeded = "the job ran longer than activeDeadlineSeconds={seconds}"
ReasonJobFailed = "JobFailed"
ReasonJobDeleted = "JobDeleted"
MessageJobDeleted = "Job {job} disappeared before it finished"
ReasonInvalidSpec = "InvalidSpec"
ReasonServing = "InferenceServiceCreated"
MessageServing = "InferenceService {name} serves {output} ({replicas} replica(s))"


@dataclass(frozen=True, slots=True)
class JobView:
    """What the status needs from the batch/v1 Job."""

    name: str
    complete: bool = False
    failed: bool = False
    failed_reason: str | None = None  # DeadlineExceeded, BackoffLimitExceeded, ...
    failed_message: str | None = None

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> JobView:
        conditions = {
            c.get("type"): c
            for c in (job.get("status") or {}).get("conditions") or ()
            if c.get("status") == "True"
        }
        failed = conditions.get("Failed") or {}
        return cls(
            name=(job.get("metadata") or {}).get("name", ""),
            complete="Complete" in conditions,
            failed=bool(failed),
            failed_reason=failed.get("reason"),
            failed_message=failed.get("message"),
        )


@dataclass(frozen=True, slots=True)
class QuantizePod:
    """What the status needs from the Job's pod."""

    name: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    created_at: datetime | None = None
    node: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None  # the runtime's termination message (or the log tail)
    finished_at: datetime | None = None
    waiting: str | None = None
    result: str | None = None  # raw lmforge.dev/result annotation

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> QuantizePod:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        statuses = status.get("containerStatuses") or []
        main = next((s for s in statuses if s.get("name") == CONTAINER_NAME), statuses[0] if statuses else {})
        state = main.get("state") or {}
        terminated = state.get("terminated") or {}
        unscheduled = next(
            (
                c
                for c in status.get("conditions") or ()
                if c.get("type") == "PodScheduled" and c.get("status") == "False"
            ),
            None,
        )
        waiting = state.get("waiting") or unscheduled or {}
        return cls(
            name=meta.get("name", ""),
            phase=status.get("phase") or "Pending",
            created_at=parse_time(meta.get("creationTimestamp")),
            node=(pod.get("spec") or {}).get("nodeName"),
            exit_code=terminated.get("exitCode"),
            reason=terminated.get("reason") or status.get("reason"),
            message=terminated.get("message") or status.get("message"),
            finished_at=parse_time(terminated.get("finishedAt")),
            waiting=": ".join(filter(None, (waiting.get("reason"), waiting.get("message")))) or None,
            result=(meta.get("annotations") or {}).get(ANNOTATION_RESULT),
        )


@dataclass(frozen=True, slots=True)
class Observed:
    name: str
    generation: int
    spec: QuantizeJobSpec
    status: QuantizeJobStatus
    job: JobView | None
    pods: tuple[QuantizePod, ...]
    now: datetime


@dataclass(frozen=True, slots=True)
class StatusEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Act first (create the Job, apply the InferenceService), then write `status`, then post `events`."""

    status: QuantizeJobStatus
    create_job: bool = False
    serve: bool = False
    events: tuple[StatusEvent, ...] = ()


# --- helpers --------------------------------------------------------------------------------------


def human_size(num_bytes: int) -> str:
    """1536 -> '1.5KiB', 4187593113 -> '3.9GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_result(raw: str | None, output: str) -> QuantizeResult:
    """The pod's report -> status.result; outputPath is the spec's URI (the pod only knows its mount)."""
    result = QuantizeResult()
    if raw:
        try:  # unknown keys are ignored; garbage leaves the numbers out, never fails the job
            result = QuantizeResult.model_validate(json.loads(raw))
        except ValueError:
            pass
    return result.model_copy(update={"output_path": output})


def size_column(result: QuantizeResult) -> str | None:
    if result.size_bytes_after is None:
        return None
    after = human_size(result.size_bytes_after)
    return f"{after} (from {human_size(result.size_bytes_before)})" if result.size_bytes_before else after


def summary(result: QuantizeResult) -> str:
    parts = [size_column(result) or ""]
    if result.kl_divergence is not None:
        parts.append(f"KL {result.kl_divergence:.4g}")
    if result.top1_agreement is not None:
        parts.append(f"top-1 agreement {100 * result.top1_agreement:.1f}%")
    text = ", ".join(p for p in parts if p)
    return f": {text}" if text else ""


def failure_detail(pod: QuantizePod) -> str:
    parts = [f"exit code {pod.exit_code}" if pod.exit_code is not None else "no exit code"]
    if pod.reason:
        parts.append(pod.reason)
    if pod.node:
        parts.append(f"node {pod.node}")
    return ", ".join(parts)


def _latest(pods: Sequence[QuantizePod]) -> QuantizePod | None:
    epoch = datetime.min.replace(tzinfo=None)
    return max(
        pods,
        key=lambda p: (p.created_at.replace(tzinfo=None) if p.created_at else epoch, p.name),
        default=None,
    )


def _created_at(status: QuantizeJobStatus) -> datetime | None:
    cond = next((c for c in status.conditions if c.type == ConditionCreated and c.status == "True"), None)
    return cond.last_transition_time if cond else None


# --- the decision ---------------------------------------------------------------------------------


def decide(obs: Observed) -> Decision:
    status = obs.status.model_copy(update={"observed_generation": obs.generation})
    spec, now, gen = obs.spec, obs.now, obs.generation
    if status.phase in TERMINAL_PHASES:
        return _serve(obs, status)
    if obs.job is None:
        created = _created_at(status)
        if created is None:
            conditions = set_condition(
                status.conditions,
                ConditionCreated,
                True,
                ReasonJobCreated,
                MessageJobCreated.format(job=obs.name, method=spec.method),
                now,
                gen,
            )
            new = status.model_copy(update={"phase": PhasePending, "conditions": conditions})
            return Decision(
                new,
                create_job=True,
                events=(
                    StatusEvent(
                        "Normal", ReasonJobCreated, MessageJobCreated.format(job=obs.name, method=spec.method)
                    ),
                ),
            )
        if now - created > JOB_GONE_GRACE:
            return _fail(obs, status, ReasonJobDeleted, MessageJobDeleted.format(job=obs.name), None)
        return Decision(status)

    pod = _latest(obs.pods)
    if pod is not None and pod.phase == "Failed":
        message = f": {pod.message.strip()}" if pod.message and pod.message.strip() else ""
        text = MessagePodFailed.format(pod=pod.name, detail=failure_detail(pod), message=message)
        return _fail(obs, status, ReasonPodFailed, text, pod)
    if obs.job.failed:
        if obs.job.failed_reason == "DeadlineExceeded":
            text = MessageDeadlineExceeded.format(seconds=spec.active_deadline_seconds)
            return _fail(obs, status, ReasonDeadlineExceeded, text, pod)
        text = f"Job {obs.job.name} failed: {obs.job.failed_reason or 'unknown reason'}" + (
            f" ({obs.job.failed_message})" if obs.job.failed_message else ""
        )
        return _fail(obs, status, ReasonJobFailed, text, pod)
    if (pod is not None and pod.phase == "Succeeded") or obs.job.complete:
        return _succeed(obs, status, pod)

    if status.start_time is None and pod is not None:
        status = status.model_copy(update={"start_time": pod.created_at or now})
    if pod is not None and pod.phase == "Running":
        message = MessagePodRunning.format(pod=pod.name, method=spec.method)
        conditions = set_condition(
            status.conditions, ConditionRunning, True, ReasonPodRunning, message, now, gen
        )
        new = status.model_copy(update={"phase": PhaseRunning, "conditions": conditions})
        events = (
            () if obs.status.phase == PhaseRunning else (StatusEvent("Normal", ReasonPodRunning, message),)
        )
        return Decision(new, events=events)
    detail = f" ({pod.waiting})" if pod is not None and pod.waiting else ""
    conditions = set_condition(
        status.conditions,
        ConditionRunning,
        False,
        ReasonPodPending,
        MessagePodPending.format(detail=detail),
        now,
        gen,
    )
    return Decision(status.model_copy(update={"phase": PhasePending, "conditions": conditions}))


def _finish_conditions(
    status: QuantizeJobStatus, phase: str, reason: str, message: str, now: datetime, gen: int
) -> list:
    conditions = status.conditions
    if any(c.type == ConditionRunning for c in conditions):
        conditions = set_condition(conditions, ConditionRunning, False, reason, message, now, gen)
    ctype = ConditionSucceeded if phase == PhaseSucceeded else ConditionFailed
    return set_condition(conditions, ctype, True, reason, message, now, gen)


def _succeed(obs: Observed, status: QuantizeJobStatus, pod: QuantizePod | None) -> Decision:
    result = parse_result(pod.result if pod else None, obs.spec.output)
    message = MessageQuantized.format(output=obs.spec.output, summary=summary(result))[:MAX_MESSAGE]
    new = status.model_copy(
        update={
            "phase": PhaseSucceeded,
            "result": result,
            "size": size_column(result),
            "completion_time": (pod.finished_at if pod and pod.finished_at else obs.now),
            "start_time": status.start_time or (pod.created_at if pod else None),
            "conditions": _finish_conditions(
                status, PhaseSucceeded, ReasonQuantized, message, obs.now, obs.generation
            ),
        }
    )
    decision = _serve(obs, new)
    return replace(decision, events=(StatusEvent("Normal", ReasonQuantized, message), *decision.events))


def _fail(
    obs: Observed, status: QuantizeJobStatus, reason: str, message: str, pod: QuantizePod | None
) -> Decision:
    message = message[:MAX_MESSAGE]
    failure = status.last_failure
    if pod is not None and pod.phase == "Failed":
        failure = LastFailure(
            pod=pod.name,
            node=pod.node,
            exit_code=pod.exit_code,
            reason=pod.reason,
            message=(pod.message or "").strip()[:MAX_MESSAGE] or None,
            time=pod.finished_at or obs.now,
        )
    new = status.model_copy(
        update={
            "phase": PhaseFailed,
            "last_failure": failure,
            "completion_time": obs.now,
            "conditions": _finish_conditions(status, PhaseFailed, reason, message, obs.now, obs.generation),
        }
    )
    return Decision(new, events=(StatusEvent("Warning", reason, message),))


def _serve(obs: Observed, status: QuantizeJobStatus) -> Decision:
    """After success: apply serveAfter's InferenceService until status.inferenceService names it."""
    target = obs.spec.serve_after
    if status.phase != PhaseSucceeded or target is None or status.inference_service == target.name:
        return Decision(status)
    new = status.model_copy(update={"inference_service": target.name})
    message = MessageServing.format(name=target.name, output=obs.spec.output, replicas=target.replicas)
    return Decision(new, serve=True, events=(StatusEvent("Normal", ReasonServing, message),))


def invalid(status: QuantizeJobStatus, generation: int, message: str, now: datetime) -> Decision:
    """A spec this operator cannot run (a CRD older/newer than it, an unsupported location): Failed."""
    if status.phase in TERMINAL_PHASES:
        return Decision(status)
    message = message[:MAX_MESSAGE]
    new = status.model_copy(
        update={
            "phase": PhaseFailed,
            "observed_generation": generation,
            "completion_time": now,
            "conditions": set_condition(
                status.conditions, ConditionFailed, True, ReasonInvalidSpec, message, now, generation
            ),
        }
    )
    return Decision(new, events=(StatusEvent("Warning", ReasonInvalidSpec, message),))
