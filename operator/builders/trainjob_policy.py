"""The TrainJob state machine as one pure function: what the cluster looks like now -> what to
do next. No I/O: the controller observes, calls `decide`, writes the status, then acts.

    Pending ──all workers Running──> Running ──rank 0 exits 0──> Succeeded
       ^                               │
       │                     a worker fails / vanishes
       │                               v
       └──backoff, new gang── Restarting      ─(not retryable or maxRestarts)─> Failed
    any non-terminal ──spec.suspend──> Suspended ──unsuspend──> Pending
    Succeeded / Failed are terminal: nothing moves them again (only the TTL deletes the job).

Invariants that make a kill -9 of the operator harmless:
- The attempt index is stored in `status.restarts` and on every pod (label lmforge.dev/restart).
  A restart is written to the status *before* the old gang is deleted; a pod whose attempt is not
  the current one is stale and is only ever deleted.
- A new gang is created only when no pod of the job is left (not even Terminating), so a rank's
  fixed name `<job>-<rank>` is free; creating an existing name is AlreadyExists, never a duplicate.
- Every time that matters (start, restart, completion) is in the status, so `decide` never needs
  memory of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from lmforge.operator.api import constants as c
from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.trainjob import FailurePolicy, Progress, ReplicaCounts, TrainJobSpec, TrainJobStatus
from lmforge.operator.builders.trainjob import CONTAINER_NAME, pod_name

MAX_BACKOFF_SECONDS = 600
RESYNC_SECONDS = 60.0  # re-check a quiet job this often even without events
MAX_MESSAGE = 512


@dataclass(frozen=True, slots=True)
class WorkerPod:
    """What the policy needs to know about one worker pod."""

    name: str
    rank: int
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    node: str | None = None
    finished_at: datetime | None = None
    deletion_timestamp: datetime | None = None  # set: Terminating; the pod should be gone by then
    progress: str | None = None  # raw lmforge.dev/progress annotation
    waiting: str | None = None  # why a Pending pod is not running yet (Unschedulable, ImagePullBackOff, ...)
    spec_hash: str | None = (
        None  # lmforge.dev/spec-hash: the spec the pod was built from (None: an older operator)
    )

    @property
    def deleting(self) -> bool:
        return self.deletion_timestamp is not None

    @property
    def active(self) -> bool:
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> WorkerPod | None:
        """Parse a pod (dict as the API returns it); None if it is not a worker pod."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            rank, attempt = int(labels[c.LABEL_RANK]), int(labels[c.LABEL_RESTART])
        except (KeyError, TypeError, ValueError):
            return None
        status = pod.get("status") or {}
        statuses = status.get("containerStatuses") or []
        main = next((s for s in statuses if s.get("name") == CONTAINER_NAME), statuses[0] if statuses else {})
        terminated = (main.get("state") or {}).get("terminated") or {}
        conditions = status.get("conditions") or ()
        ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in conditions)
        unscheduled = next(
            (
                cond
                for cond in conditions
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False"
            ),
            None,
        )
        waiting = (main.get("state") or {}).get("waiting") or unscheduled or {}
        return cls(
            name=meta.get("name", ""),
            rank=rank,
            attempt=attempt,
            phase=status.get("phase") or "Pending",
            ready=ready,
            exit_code=terminated.get("exitCode"),
            reason=terminated.get("reason") or status.get("reason"),
            message=terminated.get("message") or status.get("message"),
            node=(pod.get("spec") or {}).get("nodeName"),
            finished_at=parse_time(terminated.get("finishedAt")),
            deletion_timestamp=parse_time(meta.get("deletionTimestamp")),
            progress=(meta.get("annotations") or {}).get(c.ANNOTATION_PROGRESS),
            waiting=": ".join(filter(None, (waiting.get("reason"), waiting.get("message")))) or None,
            spec_hash=(meta.get("annotations") or {}).get(c.ANNOTATION_SPEC_HASH),
        )


@dataclass(frozen=True, slots=True)
class Observed:
    """The job as the controller sees it at `now`."""

    name: str
    generation: int
    spec: TrainJobSpec
    status: TrainJobStatus
    pods: tuple[WorkerPod, ...]
    now: datetime
    spec_hash: str | None = None  # gang_spec_hash(spec): what current pods must carry (None: not checked)
    children_applied: bool = True  # the ConfigMap and Service hold this generation's spec


@dataclass(frozen=True, slots=True)
class JobEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything to do, in this order: write `status`, post `events`, force-delete, delete,
    create `create_ranks` (of attempt `status.restarts`), delete the job."""

    status: TrainJobStatus
    create_ranks: tuple[int, ...] = ()
    delete_pods: tuple[str, ...] = ()
    force_delete_pods: tuple[str, ...] = ()
    delete_job: bool = False
    events: tuple[JobEvent, ...] = ()
    requeue_after: float = RESYNC_SECONDS


# --- helpers ---------------------------------------------------------------------------------------


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_duration(seconds: float) -> str:
    """4000 -> '1h6m', 75 -> '1m15s', 9 -> '9s'."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def is_retryable(policy: FailurePolicy, pod: WorkerPod) -> bool:
    """Exit-code classification: the lists win; otherwise 1-127 is an application error and
    128+ (a signal: 137 SIGKILL/OOMKilled, 143 SIGTERM) or no exit code at all (evicted, lost,
    deleted) is infrastructure, worth a gang restart."""
    code = pod.exit_code
    if code is None:
        return True
    if code in (policy.fail_on_exit_codes or ()):
        return False
    if code in (policy.restart_on_exit_codes or ()):
        return True
    return code >= 128


def backoff_seconds(policy: FailurePolicy, restarts: int) -> int:
    """backoffSeconds, doubled per restart after the first, capped at 10 minutes."""
    if restarts <= 0 or policy.backoff_seconds == 0:
        return 0
    return min(policy.backoff_seconds * 2 ** (restarts - 1), MAX_BACKOFF_SECONDS)


def failure_detail(pod: WorkerPod) -> str:
    parts = [f"exit code {pod.exit_code}" if pod.exit_code is not None else "no exit code"]
    if pod.reason:
        parts.append(pod.reason)
    if pod.node:
        parts.append(f"node {pod.node}")
    return ", ".join(parts)


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Upsert one condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    out, found = [], False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.status != value
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now if changed else cond.last_transition_time,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
    return out


def fold_progress(current: Progress | None, raw: str | None, now: datetime) -> Progress | None:
    """Rank 0's progress annotation -> status.progress. Garbage is ignored (keeps the last good
    report); updateTime moves only when the report changes, so a quiet job writes nothing."""
    if not raw:
        return current
    try:
        report = json.loads(raw)
        if not isinstance(report, dict):
            return current
        step = _opt(int, report.get("step"))
        total = _opt(int, report.get("totalSteps"))
        eta_seconds = _opt(int, report.get("etaSeconds"))
        folded = Progress(
            step=step,
            total_steps=total,
            summary=f"{step}/{total}" if step is not None and total is not None else None,
            epoch=_opt(float, report.get("epoch")),
            loss=_opt(float, report.get("loss")),
            tokens_per_second=_opt(float, report.get("tokensPerSecond")),
            eta_seconds=eta_seconds,
            eta=format_duration(eta_seconds) if eta_seconds is not None else None,
            last_checkpoint=_opt(str, report.get("lastCheckpoint")),
        )
    except (TypeError, ValueError):
        return current
    if current is not None and folded == current.model_copy(update={"update_time": None}):
        return current
    return folded.model_copy(update={"update_time": now})


def _opt(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


# --- the decision ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """Mutable scratchpad of one `decide` call."""

    obs: Observed
    status: TrainJobStatus
    delete: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    create: list[int] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    requeue: list[float] = field(default_factory=lambda: [RESYNC_SECONDS])
    delete_job: bool = False

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, self.obs.now, self.obs.generation
        )

    def has_condition(self, type_: str) -> bool:
        return any(cond.type == type_ and cond.status == "True" for cond in self.status.conditions)

    def transition(
        self, phase: str, event_type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        if self.status.phase != phase:
            self.events.append(JobEvent(event_type, reason, message))
        self.status.phase = phase

    def delete_active(self, pods: Iterable[WorkerPod]) -> None:
        """Delete pods still running (finished ones stay for `kubectl logs`)."""
        self.delete.extend(p.name for p in pods if p.active and p.name not in self.delete)

    def delete_all(self, pods: Iterable[WorkerPod]) -> None:
        """Delete pods that are not already going, finished or not (their names are needed)."""
        self.delete.extend(p.name for p in pods if not p.deleting and p.name not in self.delete)

    def after(self, moment: datetime) -> None:
        self.requeue.append(max((moment - self.obs.now).total_seconds(), 0.0))

    def decision(self) -> Decision:
        return Decision(
            status=self.status,
            create_ranks=tuple(self.create),
            delete_pods=tuple(self.delete),
            force_delete_pods=tuple(self.force),
            delete_job=self.delete_job,
            events=tuple(self.events),
            requeue_after=min(self.requeue),
        )


def decide(obs: Observed) -> Decision:
    spec, now = obs.spec, obs.now
    plan = _Plan(obs=obs, status=obs.status.model_copy(deep=True))
    st = plan.status
    attempt = st.restarts
    current = [p for p in obs.pods if p.attempt == attempt]
    stale = [p for p in obs.pods if p.attempt != attempt]
    outdated = [
        p for p in current if p.active and obs.spec_hash and p.spec_hash and p.spec_hash != obs.spec_hash
    ]
    if obs.children_applied and not outdated:  # observedGeneration: the children match this generation
        st.observed_generation = obs.generation

    _force_delete_stuck(plan)
    plan.delete_all(stale)
    rank0 = next((p for p in current if p.rank == 0), None)
    if st.phase not in c.TERMINAL_PHASES:
        st.progress = fold_progress(st.progress, rank0.progress if rank0 else None, now)
    st.replicas = ReplicaCounts(
        active=sum(p.active for p in current),
        succeeded=sum(p.phase == "Succeeded" for p in current),
        failed=sum(p.phase == "Failed" for p in current),
    )

    if st.phase in c.TERMINAL_PHASES:
        _finished(plan, current)
        return plan.decision()
    if st.phase is None:
        st.phase = c.PhasePending
        plan.condition(c.ConditionCreated, False, c.ReasonWaitingForPods, "no worker pods yet")
    if spec.suspend:
        _suspend(plan)
        return plan.decision()
    if st.phase == c.PhaseSuspended:
        plan.transition(c.PhasePending, "Normal", c.ReasonResumed, c.MessageResumed)
        plan.condition(c.ConditionSuspended, False, c.ReasonResumed, c.MessageResumed)

    if outdated and st.phase != c.PhaseSuspended:
        _replace_outdated(plan, current)
        return plan.decision()

    if rank0 is not None and rank0.phase == "Succeeded":
        _finish(plan, c.PhaseSucceeded, c.ReasonAllWorkersSucceeded, c.MessageAllWorkersSucceeded, "Normal")
        plan.delete_active(current)
        return plan.decision()

    failures = [p for p in current if p.phase == "Failed"]
    if st.phase == c.PhaseRunning:
        # A worker that vanishes or is deleted under a running gang broke the gang just as surely.
        failures += [
            WorkerPod(
                name=p.name,
                rank=p.rank,
                attempt=attempt,
                phase="Failed",
                reason=c.ReasonPodDeleted,
                message="the pod was deleted while the job ran",
                node=p.node,
                finished_at=now,
            )
            for p in current
            if p.deleting and p.phase not in ("Succeeded", "Failed")
        ]
        present = {p.rank for p in current}
        failures += [
            WorkerPod(
                name=pod_name(obs.name, r),
                rank=r,
                attempt=attempt,
                phase="Failed",
                reason=c.ReasonPodDeleted,
                message="the pod disappeared while the job ran",
                finished_at=now,
            )
            for r in range(spec.num_nodes)
            if r not in present
        ]
    if failures:
        _on_failure(plan, failures, current)
        return plan.decision()

    if spec.active_deadline_seconds and st.start_time:
        deadline = st.start_time + timedelta(seconds=spec.active_deadline_seconds)
        if now >= deadline:
            message = c.MessageDeadlineExceeded.format(seconds=spec.active_deadline_seconds)
            _finish(plan, c.PhaseFailed, c.ReasonDeadlineExceeded, message, "Warning")
            plan.delete_active(obs.pods)
            return plan.decision()
        plan.after(deadline)

    if st.phase == c.PhaseRestarting and st.last_restart_time:
        resume_at = st.last_restart_time + timedelta(
            seconds=backoff_seconds(spec.failure_policy, st.restarts)
        )
        if now < resume_at:
            plan.after(resume_at)
            return plan.decision()

    _run(plan, current)
    return plan.decision()


def _replace_outdated(plan: _Plan, current: list[WorkerPod]) -> None:
    """A gang built from an older spec runs (the change got in while suspended, but the operator
    never saw the suspended state): delete it and start over from Pending, like a resume. Not a
    failure: restarts and the backoff are untouched."""
    message = c.MessageSpecChanged.format(generation=plan.obs.generation)
    plan.delete_all(current)
    plan.transition(c.PhasePending, "Normal", c.ReasonSpecChanged, message)
    plan.condition(c.ConditionRunning, False, c.ReasonSpecChanged, message)
    plan.condition(c.ConditionCreated, False, c.ReasonSpecChanged, message)
    plan.requeue.append(1.0)


def creation_failed(
    status: TrainJobStatus,
    generation: int,
    now: datetime,
    pod: str,
    http_status: int,
    error: str,
    service_account: str | None,
    namespace: str,
) -> tuple[TrainJobStatus, JobEvent | None]:
    """The API server refused a worker pod (403 missing ServiceAccount / RBAC / quota, 404, 422):
    Created=False naming the cause. The Event goes out only when the cause is new (same reason and
    message as the condition already holds: no Event), so a retry loop posts it once."""
    missing_account = service_account is not None and "serviceaccount" in error.lower()
    if missing_account:
        reason = c.ReasonServiceAccountMissing
        message = c.MessageServiceAccountMissing.format(
            pod=pod, account=service_account, namespace=namespace, error=error
        )
    else:
        reason = c.ReasonPodCreationFailed
        message = c.MessagePodCreationFailed.format(pod=pod, error=f"{http_status} {error}")
    message = message[:MAX_MESSAGE]
    before = next((cond for cond in status.conditions if cond.type == c.ConditionCreated), None)
    new = status.model_copy(deep=True)
    new.conditions = set_condition(
        new.conditions, c.ConditionCreated, False, reason, message, now, generation
    )
    repeated = (
        before is not None
        and before.status == "False"
        and (before.reason, before.message) == (reason, message)
    )
    return new, None if repeated else JobEvent("Warning", reason, message)


def _force_delete_stuck(plan: _Plan) -> None:
    grace = timedelta(seconds=plan.obs.spec.failure_policy.force_delete_after_seconds)
    for pod in plan.obs.pods:
        if pod.deletion_timestamp is None:
            continue
        if plan.obs.now >= pod.deletion_timestamp + grace:
            plan.force.append(pod.name)
            seconds = int((plan.obs.now - pod.deletion_timestamp).total_seconds())
            plan.events.append(
                JobEvent(
                    "Warning",
                    c.ReasonForceDeleted,
                    c.MessageForceDeleted.format(pod=pod.name, seconds=seconds),
                )
            )
        else:
            plan.after(pod.deletion_timestamp + grace)


def _finished(plan: _Plan, current: list[WorkerPod]) -> None:
    """Terminal: keep finished pods for `kubectl logs`, remove running ones, honour the TTL."""
    plan.delete_active(current)
    ttl, done = plan.obs.spec.ttl_seconds_after_finished, plan.status.completion_time
    if ttl is None or done is None:
        return
    expiry = done + timedelta(seconds=ttl)
    if plan.obs.now >= expiry:
        plan.delete_job = True
        plan.delete_all(plan.obs.pods)
        plan.events.append(JobEvent("Normal", c.ReasonTTLExpired, c.MessageTTLExpired.format(seconds=ttl)))
    else:
        plan.after(expiry)


def _finish(
    plan: _Plan, phase: str, reason: str, message: str, event_type: Literal["Normal", "Warning"]
) -> None:
    st = plan.status
    plan.transition(phase, event_type, reason, message)
    st.completion_time = plan.obs.now
    plan.condition(phase, True, reason, message)  # Succeeded / Failed
    if plan.has_condition(c.ConditionRunning):
        plan.condition(c.ConditionRunning, False, reason, message)
    if plan.has_condition(c.ConditionRestarting):
        plan.condition(c.ConditionRestarting, False, reason, message)
    ttl = plan.obs.spec.ttl_seconds_after_finished
    if ttl is not None:
        plan.requeue.append(float(ttl))


def _suspend(plan: _Plan) -> None:
    plan.delete_all(plan.obs.pods)
    if plan.status.phase != c.PhaseSuspended:
        plan.transition(c.PhaseSuspended, "Normal", c.ReasonSuspended, c.MessageSuspended)
        plan.condition(c.ConditionSuspended, True, c.ReasonSuspended, c.MessageSuspended)
        if plan.has_condition(c.ConditionRunning):
            plan.condition(c.ConditionRunning, False, c.ReasonSuspended, c.MessageSuspended)
        plan.status.start_time = None  # activeDeadlineSeconds counts from the resume, as for a Job


def _on_failure(plan: _Plan, failures: list[WorkerPod], current: list[WorkerPod]) -> None:
    """The earliest failure is the root cause (peers of a dead rank fail afterwards, usually
    with NCCL errors and exit 1): classify that one."""
    st, policy, now = plan.status, plan.obs.spec.failure_policy, plan.obs.now
    root = min(failures, key=lambda p: (p.finished_at or now, p.rank))
    detail = failure_detail(root)
    st.last_failure = LastFailure(
        pod=root.name,
        node=root.node,
        exit_code=root.exit_code,
        reason=root.reason,
        message=root.message,
        time=root.finished_at or now,
    )
    if not is_retryable(policy, root):
        message = c.MessageNonRetryableExitCode.format(pod=root.name, detail=detail)
        _finish(plan, c.PhaseFailed, c.ReasonNonRetryableExitCode, message, "Warning")
        plan.delete_active(current)
        return
    if st.restarts >= policy.max_restarts:
        message = c.MessageMaxRestartsExceeded.format(
            pod=root.name, detail=detail, restarts=st.restarts, max_restarts=policy.max_restarts
        )
        _finish(plan, c.PhaseFailed, c.ReasonMaxRestartsExceeded, message, "Warning")
        plan.delete_active(current)
        return
    st.restarts += 1
    st.last_restart_time = now
    message = c.MessageRetryableFailure.format(
        pod=root.name, detail=detail, attempt=st.restarts, max_attempts=policy.max_restarts
    )
    st.phase = c.PhaseRestarting
    plan.events.append(JobEvent("Warning", c.ReasonRetryableFailure, message))
    plan.condition(c.ConditionRestarting, True, c.ReasonRetryableFailure, message)
    plan.condition(c.ConditionRunning, False, c.ReasonRetryableFailure, message)
    plan.delete_all(current)
    plan.after(now + timedelta(seconds=backoff_seconds(policy, st.restarts)))


def _creation_failing(plan: _Plan) -> bool:
    return any(
        cond.type == c.ConditionCreated
        and cond.status == "False"
        and cond.reason in (c.ReasonServiceAccountMissing, c.ReasonPodCreationFailed)
        for cond in plan.status.conditions
    )


def _run(plan: _Plan, current: list[WorkerPod]) -> None:
    """Create the gang when nothing of the job is left; then track it until all run."""
    obs, st = plan.obs, plan.status
    num_nodes = obs.spec.num_nodes
    if not current and obs.pods:
        plan.requeue.append(1.0)  # stale or Terminating pods still hold the names: wait for them
        return
    present = {p.rank for p in current}
    if any(p.deleting for p in current):
        plan.requeue.append(1.0)
        return
    missing = [r for r in range(num_nodes) if r not in present]
    if missing:
        plan.create.extend(missing)
        plan.requeue.append(5.0)
        if not current:  # a whole new gang: Created only once its pods exist (next pass)
            if st.start_time is None:
                st.start_time = obs.now
            if not _creation_failing(plan):  # keep the refusal's message until pods exist
                plan.condition(
                    c.ConditionCreated,
                    False,
                    c.ReasonCreatingPods,
                    c.MessageCreatingPods.format(num_nodes=num_nodes, attempt=st.restarts),
                )
        return
    if not plan.has_condition(c.ConditionCreated):  # every rank's pod exists now
        if st.restarts:
            message = c.MessageGangRestarted.format(num_nodes=num_nodes, attempt=st.restarts)
            plan.events.append(JobEvent("Normal", c.ReasonGangRestarted, message))
        else:
            message = c.MessageGangCreated.format(num_nodes=num_nodes, attempt=st.restarts)
            plan.events.append(JobEvent("Normal", c.ReasonGangCreated, message))
        plan.condition(c.ConditionCreated, True, c.ReasonGangCreated, message)
    running = sum(p.phase in ("Running", "Succeeded") for p in current)  # ranks > 0 may finish first
    if running == num_nodes:
        message = c.MessageAllWorkersRunning.format(num_nodes=num_nodes)
        plan.transition(c.PhaseRunning, "Normal", c.ReasonAllWorkersRunning, message)
        plan.condition(c.ConditionRunning, True, c.ReasonAllWorkersRunning, message)
        if plan.has_condition(c.ConditionRestarting):
            plan.condition(c.ConditionRestarting, False, c.ReasonAllWorkersRunning, message)
    else:
        message = c.MessageWaitingForPods.format(running=running, num_nodes=num_nodes)
        stuck = next((p for p in sorted(current, key=lambda p: p.rank) if p.waiting), None)
        if stuck is not None:  # say why, instead of an unexplained Pending
            message = f"{message}; {stuck.name}: {stuck.waiting}"[:MAX_MESSAGE]
        plan.condition(c.ConditionRunning, False, c.ReasonWaitingForPods, message)
