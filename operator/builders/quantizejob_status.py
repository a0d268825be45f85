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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from lmforge.operator import clock
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.constants import (
    TERMINAL_PHASES,
    PhaseFailed,
    PhasePending,
    PhaseRunning,
    PhaseSucceeded,
)
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus, QuantizeResult
from lmforge.operator.builders.conditions import find_condition, set_condition
from lmforge.operator.builders.quantizejob import ANNOTATION_RESULT, CONTAINER_NAME
from lmforge.operator.decision import Apply, Create, Decision, Event, Object

# A Job we created but cannot see (yet) is given this long before the job counts as failed:
# the watch that feeds the index may lag behind our own create.
JOB_GONE_GRACE = timedelta(seconds=60)
INTERVAL_SECONDS = 3.0  # look again this often while the job runs (LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS)


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
            created_at=clock.parse_time(meta.get("creationTimestamp")),
            node=(pod.get("spec") or {}).get("nodeName"),
            exit_code=terminated.get("exitCode"),
            reason=terminated.get("reason") or status.get("reason"),
            message=terminated.get("message") or status.get("message"),
            finished_at=clock.parse_time(terminated.get("finishedAt")),
            waiting=": ".join(filter(None, (waiting.get("reason"), waiting.get("message")))) or None,
            result=(meta.get("annotations") or {}).get(ANNOTATION_RESULT),
        )


@dataclass(frozen=True, slots=True)
class Observed:
    """The QuantizeJob as the controller sees it at `now`, with the objects it owns, built."""

    name: str
    generation: int
    spec: QuantizeJobSpec
    status: QuantizeJobStatus
    job: JobView | None
    pods: tuple[QuantizePod, ...]
    now: datetime
    job_object: Object = field(default_factory=dict)  # builders/quantizejob.py `job`
    serve_object: Object | None = None  # the serveAfter InferenceService, if any
    served: bool = False  # this process applied serve_object (the status may say so now)
    interval: float = INTERVAL_SECONDS


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
    cond = find_condition(status.conditions, r.ConditionCreated)
    return cond.last_transition_time if cond is not None and cond.status == "True" else None


# --- the decision ---------------------------------------------------------------------------------


def decide(obs: Observed) -> Decision[QuantizeJobStatus]:
    """Status first, then act: the Job has the QuantizeJob's name, so creating it again (until a
    pod shows it exists) is AlreadyExists, never a second Job."""
    status = obs.status.model_copy(update={"observed_generation": obs.generation})
    if status.phase in TERMINAL_PHASES:
        return _serve(obs, status)
    if obs.job is None:
        return _job_missing(obs, status)
    pod = _latest(obs.pods)
    failed = _failure(obs, obs.job, pod)
    if failed is not None:
        reason, text = failed
        return _fail(obs, status, reason, text, pod)
    if (pod is not None and pod.phase == "Succeeded") or obs.job.complete:
        return _succeed(obs, status, pod)
    if status.start_time is None and pod is not None:
        status = status.model_copy(update={"start_time": pod.created_at or obs.now})
    if pod is not None and pod.phase == "Running":
        return _running(obs, status, pod)
    return _pending(obs, status, pod)


def _job_missing(obs: Observed, status: QuantizeJobStatus) -> Decision[QuantizeJobStatus]:
    """No Job in the index: create it (first pass), create it again while no pod was ever seen
    (the first create may not have gone through), or fail once it stays gone past the grace."""
    created = _created_at(status)
    message = r.MessageJobCreated.format(job=obs.name, method=obs.spec.method)
    if created is None:
        conditions = set_condition(
            status.conditions, r.ConditionCreated, True, r.ReasonJobCreated, message, obs.now, obs.generation
        )
        return Decision(
            status.model_copy(update={"phase": PhasePending, "conditions": conditions}),
            events=(Event("Normal", r.ReasonJobCreated, message),),
            actions=(Create(obs.job_object),),
            requeue_after=obs.interval,
        )
    if obs.now - created > JOB_GONE_GRACE:
        return _fail(obs, status, r.ReasonJobDeleted, r.MessageJobDeleted.format(job=obs.name), None)
    recreate = (Create(obs.job_object),) if status.start_time is None else ()
    return Decision(status, actions=recreate, requeue_after=obs.interval)


def _failure(obs: Observed, job: JobView, pod: QuantizePod | None) -> tuple[str, str] | None:
    """(reason, message) when the pod or the Job failed."""
    if pod is not None and pod.phase == "Failed":
        message = f": {pod.message.strip()}" if pod.message and pod.message.strip() else ""
        return r.ReasonPodFailed, r.MessagePodFailed.format(
            pod=pod.name, detail=failure_detail(pod), message=message
        )
    if not job.failed:
        return None
    if job.failed_reason == "DeadlineExceeded":
        return r.ReasonDeadlineExceeded, r.MessageDeadlineExceeded.format(
            seconds=obs.spec.active_deadline_seconds
        )
    text = f"Job {job.name} failed: {job.failed_reason or 'unknown reason'}" + (
        f" ({job.failed_message})" if job.failed_message else ""
    )
    return r.ReasonJobFailed, text


def _running(obs: Observed, status: QuantizeJobStatus, pod: QuantizePod) -> Decision[QuantizeJobStatus]:
    message = r.MessagePodRunning.format(pod=pod.name, method=obs.spec.method)
    conditions = set_condition(
        status.conditions, r.ConditionRunning, True, r.ReasonPodRunning, message, obs.now, obs.generation
    )
    new = status.model_copy(update={"phase": PhaseRunning, "conditions": conditions})
    events = () if obs.status.phase == PhaseRunning else (Event("Normal", r.ReasonPodRunning, message),)
    return Decision(new, events=events, requeue_after=obs.interval)


def _pending(
    obs: Observed, status: QuantizeJobStatus, pod: QuantizePod | None
) -> Decision[QuantizeJobStatus]:
    detail = f" ({pod.waiting})" if pod is not None and pod.waiting else ""
    conditions = set_condition(
        status.conditions,
        r.ConditionRunning,
        False,
        r.ReasonPodPending,
        r.MessagePodPending.format(detail=detail),
        obs.now,
        obs.generation,
    )
    new = status.model_copy(update={"phase": PhasePending, "conditions": conditions})
    return Decision(new, requeue_after=obs.interval)


def _finish_conditions(
    status: QuantizeJobStatus, phase: str, reason: str, message: str, now: datetime, gen: int
) -> list[Condition]:
    conditions = status.conditions
    if find_condition(conditions, r.ConditionRunning) is not None:
        conditions = set_condition(conditions, r.ConditionRunning, False, reason, message, now, gen)
    ctype = r.ConditionSucceeded if phase == PhaseSucceeded else r.ConditionFailed
    return set_condition(conditions, ctype, True, reason, message, now, gen)


def _succeed(
    obs: Observed, status: QuantizeJobStatus, pod: QuantizePod | None
) -> Decision[QuantizeJobStatus]:
    result = parse_result(pod.result if pod else None, obs.spec.output)
    message = r.MessageQuantized.format(output=obs.spec.output, summary=summary(result))[: r.MAX_MESSAGE]
    new = status.model_copy(
        update={
            "phase": PhaseSucceeded,
            "result": result,
            "size": size_column(result),
            "completion_time": (pod.finished_at if pod and pod.finished_at else obs.now),
            "start_time": status.start_time or (pod.created_at if pod else None),
            "conditions": _finish_conditions(
                status, PhaseSucceeded, r.ReasonQuantized, message, obs.now, obs.generation
            ),
        }
    )
    decision = _serve(obs, new)
    return replace(decision, events=(Event("Normal", r.ReasonQuantized, message), *decision.events))


def _fail(
    obs: Observed, status: QuantizeJobStatus, reason: str, message: str, pod: QuantizePod | None
) -> Decision[QuantizeJobStatus]:
    message = message[: r.MAX_MESSAGE]
    failure = status.last_failure
    if pod is not None and pod.phase == "Failed":
        failure = LastFailure(
            pod=pod.name,
            node=pod.node,
            exit_code=pod.exit_code,
            reason=pod.reason,
            message=(pod.message or "").strip()[: r.MAX_MESSAGE] or None,
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
    return Decision(new, events=(Event("Warning", reason, message),), requeue_after=None)


def _serve(obs: Observed, status: QuantizeJobStatus) -> Decision[QuantizeJobStatus]:
    """After success: apply serveAfter's InferenceService until status.inferenceService names it.
    Two passes, so the status never names an InferenceService that was not applied: the apply,
    then (`served`, at once) status.inferenceService and its Event. An operator killed between the
    two applies again (server-side apply: harmless). Finished and served: nothing left to watch."""
    target = obs.spec.serve_after
    if status.phase != PhaseSucceeded or target is None or obs.serve_object is None:
        return Decision(status, requeue_after=None)
    if status.inference_service == target.name:
        return Decision(status, requeue_after=None)
    if not obs.served:
        return Decision(status, actions=(Apply(obs.serve_object),), requeue_after=0.0)
    new = status.model_copy(update={"inference_service": target.name})
    message = r.MessageServing.format(name=target.name, output=obs.spec.output, replicas=target.replicas)
    return Decision(new, events=(Event("Normal", r.ReasonServing, message),), requeue_after=None)
