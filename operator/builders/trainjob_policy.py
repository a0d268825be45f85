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

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from lmforge.operator.api import constants as c
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import LastFailure
from lmforge.operator.api.trainjob import (
    FailurePolicy,
    ReplicaCounts,
    TrainJobPhase,
    TrainJobSpec,
    TrainJobStatus,
)
from lmforge.operator.builders import trainjob as build
from lmforge.operator.builders.conditions import has_condition, set_condition
from lmforge.operator.builders.trainjob import pod_name
from lmforge.operator.builders.trainjob_pods import WorkerPod, failure_detail, fold_progress
from lmforge.operator.decision import (
    RESYNC_SECONDS,
    Action,
    Apply,
    Create,
    Decision,
    Delete,
    DeleteCollection,
    Event,
)

MAX_BACKOFF_SECONDS = 600
REFUSED_RETRY_SECONDS = 5.0  # a refused worker pod (missing ServiceAccount, ...): try again this often


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
    namespace: str = "default"
    uid: str = ""
    cfg: build.BuildConfig = field(default_factory=build.BuildConfig)

    @property
    def ref(self) -> build.JobRef:
        return build.JobRef(name=self.name, namespace=self.namespace, uid=self.uid)


# --- helpers ---------------------------------------------------------------------------------------


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


# --- the decision ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """Mutable scratchpad of one `decide` call."""

    obs: Observed
    status: TrainJobStatus
    delete: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    create: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue: list[float] = field(default_factory=lambda: [RESYNC_SECONDS])
    delete_job: bool = False

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, self.obs.now, self.obs.generation
        )

    def has_condition(self, type_: str) -> bool:
        return has_condition(self.status.conditions, type_)

    def transition(
        self, phase: TrainJobPhase, event_type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        if self.status.phase != phase:
            self.events.append(Event(event_type, reason, message))
        self.status.phase = phase

    def delete_active(self, pods: Iterable[WorkerPod]) -> None:
        """Delete pods still running (finished ones stay for `kubectl logs`)."""
        self.delete.extend(p.name for p in pods if p.active and p.name not in self.delete)

    def delete_all(self, pods: Iterable[WorkerPod]) -> None:
        """Delete pods that are not already going, finished or not (their names are needed)."""
        self.delete.extend(p.name for p in pods if not p.deleting and p.name not in self.delete)

    def after(self, moment: datetime) -> None:
        self.requeue.append(max((moment - self.obs.now).total_seconds(), 0.0))

    def decision(self) -> Decision[TrainJobStatus]:
        """The plan as actions, in this order: delete pods (stuck ones at once), apply the
        ConfigMap and the Service (a new generation, or before a gang starts: the gang reads
        exactly this spec's train.json), create the missing ranks, delete the job."""
        obs, ns = self.obs, self.obs.namespace
        actions: list[Action] = [Delete("v1", "Pod", ns, pod, grace_period_seconds=0) for pod in self.force]
        actions += [Delete("v1", "Pod", ns, pod) for pod in self.delete]
        finished = self.status.phase in c.TERMINAL_PHASES
        new_generation = not obs.children_applied and not finished and not self.delete_job
        if new_generation or self.create:
            actions += [
                Apply(build.headless_service(obs.ref, obs.cfg)),
                Apply(build.config_map(obs.ref, obs.spec)),
            ]
        if self.create:  # all at once: a pod waits for its ConfigMap in the kubelet, not here
            pods = build.gang(obs.ref, obs.spec, self.status.restarts, self.create, obs.cfg)
            actions += [Create(pod) for pod in pods]
        if self.delete_job:
            actions += [*delete_children(ns, obs.name), Delete(c.API_VERSION, "TrainJob", ns, obs.name)]
        return Decision(
            status=self.status,
            events=tuple(self.events),
            actions=tuple(actions),
            requeue_after=self._requeue(finished),
            applies_generation=obs.generation if new_generation else None,
        )

    def _requeue(self, finished: bool) -> float | None:
        """None once nothing is left to watch: deleted, or finished without a TTL and with only
        finished pods left (kept for `kubectl logs`)."""
        if self.delete_job:
            return None
        settled = all(not p.active and not p.deleting for p in self.obs.pods)
        idle = settled and not (self.delete or self.force)
        if finished and self.obs.spec.ttl_seconds_after_finished is None and idle:
            return None
        return min(self.requeue)


def delete_children(namespace: str, name: str) -> list[Action]:
    """The job's pods, Service and ConfigMap, explicitly: the garbage collector may lag behind (or
    be absent). What is already gone counts as deleted."""
    selector = f"{c.LABEL_JOB_NAME}={name},{c.LABEL_KIND}=TrainJob"
    return [
        DeleteCollection("v1", "Pod", namespace, selector),
        Delete("v1", "Service", namespace, name),
        Delete("v1", "ConfigMap", namespace, build.config_map_name(name)),
    ]


@dataclass(frozen=True, slots=True)
class _Pods:
    """The job's pods of the current attempt, sorted out once per `decide`."""

    current: list[WorkerPod]
    outdated: list[WorkerPod]  # running from an older spec (their spec-hash differs)
    rank0: WorkerPod | None


def decide(obs: Observed) -> Decision[TrainJobStatus]:
    """The state machine of the module docstring: the first step that decides ends the pass."""
    plan = _Plan(obs=obs, status=obs.status.model_copy(deep=True))
    pods = _sort_pods(plan)
    steps = (_terminal, _start_or_suspend, _outdated, _succeeded, _failed, _deadline, _backing_off)
    if not any(step(plan, pods) for step in steps):
        _run(plan, pods.current)
    return plan.decision()


def _sort_pods(plan: _Plan) -> _Pods:
    """Bookkeeping every pass does: observedGeneration, stuck and stale pods, progress, counts."""
    obs, st = plan.obs, plan.status
    current = [p for p in obs.pods if p.attempt == st.restarts]
    outdated = [
        p for p in current if p.active and obs.spec_hash and p.spec_hash and p.spec_hash != obs.spec_hash
    ]
    if obs.children_applied and not outdated:  # observedGeneration: the children match this generation
        st.observed_generation = obs.generation
    _force_delete_stuck(plan)
    plan.delete_all(p for p in obs.pods if p.attempt != st.restarts)
    rank0 = next((p for p in current if p.rank == 0), None)
    if st.phase not in c.TERMINAL_PHASES:
        st.progress = fold_progress(st.progress, rank0.progress if rank0 else None, obs.now)
    st.replicas = ReplicaCounts(
        active=sum(p.active for p in current),
        succeeded=sum(p.phase == "Succeeded" for p in current),
        failed=sum(p.phase == "Failed" for p in current),
    )
    return _Pods(current=current, outdated=outdated, rank0=rank0)


def _terminal(plan: _Plan, pods: _Pods) -> bool:
    if plan.status.phase not in c.TERMINAL_PHASES:
        return False
    _finished(plan, pods.current)
    return True


def _start_or_suspend(plan: _Plan, pods: _Pods) -> bool:
    """A new job is Pending; spec.suspend suspends it (decided); unsuspended it resumes."""
    st = plan.status
    if st.phase is None:
        st.phase = c.PhasePending
        plan.condition(r.ConditionCreated, False, r.ReasonWaitingForPods, "no worker pods yet")
    if plan.obs.spec.suspend:
        _suspend(plan)
        return True
    if st.phase == c.PhaseSuspended:
        plan.transition(c.PhasePending, "Normal", r.ReasonResumed, r.MessageResumed)
        plan.condition(r.ConditionSuspended, False, r.ReasonResumed, r.MessageResumed)
    return False


def _outdated(plan: _Plan, pods: _Pods) -> bool:
    if not pods.outdated or plan.status.phase == c.PhaseSuspended:
        return False
    _replace_outdated(plan, pods.current)
    return True


def _succeeded(plan: _Plan, pods: _Pods) -> bool:
    if pods.rank0 is None or pods.rank0.phase != "Succeeded":
        return False
    _finish(plan, c.PhaseSucceeded, r.ReasonAllWorkersSucceeded, r.MessageAllWorkersSucceeded, "Normal")
    plan.delete_active(pods.current)
    return True


def _failed(plan: _Plan, pods: _Pods) -> bool:
    failures = [p for p in pods.current if p.phase == "Failed"]
    if plan.status.phase == c.PhaseRunning:
        failures += _broken_ranks(plan.obs, pods.current, plan.status.restarts)
    if not failures:
        return False
    _on_failure(plan, failures, pods.current)
    return True


def _broken_ranks(obs: Observed, current: list[WorkerPod], attempt: int) -> list[WorkerPod]:
    """A worker that vanishes or is deleted under a running gang broke the gang just as surely as
    one that failed: each becomes a failed pod of reason PodDeleted."""
    deleted = [
        WorkerPod(
            name=p.name,
            rank=p.rank,
            attempt=attempt,
            phase="Failed",
            reason=r.ReasonPodDeleted,
            message="the pod was deleted while the job ran",
            node=p.node,
            finished_at=obs.now,
        )
        for p in current
        if p.deleting and p.phase not in ("Succeeded", "Failed")
    ]
    present = {p.rank for p in current}
    vanished = [
        WorkerPod(
            name=pod_name(obs.name, rank),
            rank=rank,
            attempt=attempt,
            phase="Failed",
            reason=r.ReasonPodDeleted,
            message="the pod disappeared while the job ran",
            finished_at=obs.now,
        )
        for rank in range(obs.spec.num_nodes)
        if rank not in present
    ]
    return deleted + vanished


def _deadline(plan: _Plan, pods: _Pods) -> bool:
    spec, st = plan.obs.spec, plan.status
    if not spec.active_deadline_seconds or not st.start_time:
        return False
    deadline = st.start_time + timedelta(seconds=spec.active_deadline_seconds)
    if plan.obs.now < deadline:
        plan.after(deadline)
        return False
    message = r.MessageDeadlineExceeded.format(seconds=spec.active_deadline_seconds)
    _finish(plan, c.PhaseFailed, r.ReasonDeadlineExceeded, message, "Warning")
    plan.delete_active(plan.obs.pods)
    return True


def _backing_off(plan: _Plan, pods: _Pods) -> bool:
    st = plan.status
    if st.phase != c.PhaseRestarting or not st.last_restart_time:
        return False
    resume_at = st.last_restart_time + timedelta(
        seconds=backoff_seconds(plan.obs.spec.failure_policy, st.restarts)
    )
    if plan.obs.now >= resume_at:
        return False
    plan.after(resume_at)
    return True


def _replace_outdated(plan: _Plan, current: list[WorkerPod]) -> None:
    """A gang built from an older spec runs (the change got in while suspended, but the operator
    never saw the suspended state): delete it and start over from Pending, like a resume. Not a
    failure: restarts and the backoff are untouched."""
    message = r.MessageSpecChanged.format(generation=plan.obs.generation)
    plan.delete_all(current)
    plan.transition(c.PhasePending, "Normal", r.ReasonSpecChanged, message)
    plan.condition(r.ConditionRunning, False, r.ReasonSpecChanged, message)
    plan.condition(r.ConditionCreated, False, r.ReasonSpecChanged, message)
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
) -> tuple[TrainJobStatus, Event | None]:
    """The API server refused a worker pod (403 missing ServiceAccount / RBAC / quota, 404, 422):
    Created=False naming the cause. The Event goes out only when the cause is new (same reason and
    message as the condition already holds: no Event), so a retry loop posts it once."""
    missing_account = service_account is not None and "serviceaccount" in error.lower()
    if missing_account:
        reason = r.ReasonServiceAccountMissing
        message = r.MessageServiceAccountMissing.format(
            pod=pod, account=service_account, namespace=namespace, error=error
        )
    else:
        reason = r.ReasonPodCreationFailed
        message = r.MessagePodCreationFailed.format(pod=pod, error=f"{http_status} {error}")
    message = message[: r.MAX_MESSAGE]
    before = next((cond for cond in status.conditions if cond.type == r.ConditionCreated), None)
    new = status.model_copy(deep=True)
    new.conditions = set_condition(
        new.conditions, r.ConditionCreated, False, reason, message, now, generation
    )
    repeated = (
        before is not None
        and before.status == "False"
        and (before.reason, before.message) == (reason, message)
    )
    return new, None if repeated else Event("Warning", reason, message)


def _force_delete_stuck(plan: _Plan) -> None:
    grace = timedelta(seconds=plan.obs.spec.failure_policy.force_delete_after_seconds)
    for pod in plan.obs.pods:
        if pod.deletion_timestamp is None:
            continue
        if plan.obs.now >= pod.deletion_timestamp + grace:
            plan.force.append(pod.name)
            seconds = int((plan.obs.now - pod.deletion_timestamp).total_seconds())
            plan.events.append(
                Event(
                    "Warning",
                    r.ReasonForceDeleted,
                    r.MessageForceDeleted.format(pod=pod.name, seconds=seconds),
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
        plan.events.append(Event("Normal", r.ReasonTTLExpired, r.MessageTTLExpired.format(seconds=ttl)))
    else:
        plan.after(expiry)


def _finish(
    plan: _Plan, phase: TrainJobPhase, reason: str, message: str, event_type: Literal["Normal", "Warning"]
) -> None:
    st = plan.status
    plan.transition(phase, event_type, reason, message)
    st.completion_time = plan.obs.now
    plan.condition(phase, True, reason, message)  # Succeeded / Failed
    if plan.has_condition(r.ConditionRunning):
        plan.condition(r.ConditionRunning, False, reason, message)
    if plan.has_condition(r.ConditionRestarting):
        plan.condition(r.ConditionRestarting, False, reason, message)
    ttl = plan.obs.spec.ttl_seconds_after_finished
    if ttl is not None:
        plan.requeue.append(float(ttl))


def _suspend(plan: _Plan) -> None:
    plan.delete_all(plan.obs.pods)
    if plan.status.phase != c.PhaseSuspended:
        plan.transition(c.PhaseSuspended, "Normal", r.ReasonSuspended, r.MessageSuspended)
        plan.condition(r.ConditionSuspended, True, r.ReasonSuspended, r.MessageSuspended)
        if plan.has_condition(r.ConditionRunning):
            plan.condition(r.ConditionRunning, False, r.ReasonSuspended, r.MessageSuspended)
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
        message = r.MessageNonRetryableExitCode.format(pod=root.name, detail=detail)
        _finish(plan, c.PhaseFailed, r.ReasonNonRetryableExitCode, message, "Warning")
        plan.delete_active(current)
        return
    if st.restarts >= policy.max_restarts:
        message = r.MessageMaxRestartsExceeded.format(
            pod=root.name, detail=detail, restarts=st.restarts, max_restarts=policy.max_restarts
        )
        _finish(plan, c.PhaseFailed, r.ReasonMaxRestartsExceeded, message, "Warning")
        plan.delete_active(current)
        return
    st.restarts += 1
    st.last_restart_time = now
    message = r.MessageRetryableFailure.format(
        pod=root.name, detail=detail, attempt=st.restarts, max_attempts=policy.max_restarts
    )
    st.phase = c.PhaseRestarting
    plan.events.append(Event("Warning", r.ReasonRetryableFailure, message))
    plan.condition(r.ConditionRestarting, True, r.ReasonRetryableFailure, message)
    plan.condition(r.ConditionRunning, False, r.ReasonRetryableFailure, message)
    plan.delete_all(current)
    plan.after(now + timedelta(seconds=backoff_seconds(policy, st.restarts)))


def _creation_failing(plan: _Plan) -> bool:
    return any(
        cond.type == r.ConditionCreated
        and cond.status == "False"
        and cond.reason in (r.ReasonServiceAccountMissing, r.ReasonPodCreationFailed)
        for cond in plan.status.conditions
    )


def _run(plan: _Plan, current: list[WorkerPod]) -> None:
    """Create the gang when nothing of the job is left; then track it until all run."""
    obs = plan.obs
    if (not current and obs.pods) or any(p.deleting for p in current):
        plan.requeue.append(1.0)  # stale or Terminating pods still hold the names: wait for them
        return
    present = {p.rank for p in current}
    missing = [rank for rank in range(obs.spec.num_nodes) if rank not in present]
    if missing:
        _create(plan, missing, whole_gang=not current)
        return
    if not plan.has_condition(r.ConditionCreated):  # every rank's pod exists now
        _gang_created(plan)
    _track(plan, current)


def _create(plan: _Plan, missing: list[int], whole_gang: bool) -> None:
    plan.create.extend(missing)
    plan.requeue.append(5.0)
    st = plan.status
    if not whole_gang:
        return
    # a whole new gang: Created only once its pods exist (next pass)
    if st.start_time is None:
        st.start_time = plan.obs.now
    if not _creation_failing(plan):  # keep the refusal's message until pods exist
        message = r.MessageCreatingPods.format(num_nodes=plan.obs.spec.num_nodes, attempt=st.restarts)
        plan.condition(r.ConditionCreated, False, r.ReasonCreatingPods, message)


def _gang_created(plan: _Plan) -> None:
    num_nodes, attempt = plan.obs.spec.num_nodes, plan.status.restarts
    if attempt:
        message = r.MessageGangRestarted.format(num_nodes=num_nodes, attempt=attempt)
        plan.events.append(Event("Normal", r.ReasonGangRestarted, message))
    else:
        message = r.MessageGangCreated.format(num_nodes=num_nodes, attempt=attempt)
        plan.events.append(Event("Normal", r.ReasonGangCreated, message))
    plan.condition(r.ConditionCreated, True, r.ReasonGangCreated, message)


def _track(plan: _Plan, current: list[WorkerPod]) -> None:
    """Running once every rank runs (ranks > 0 may finish first); until then say who waits, and why."""
    num_nodes = plan.obs.spec.num_nodes
    running = sum(p.phase in ("Running", "Succeeded") for p in current)
    if running == num_nodes:
        message = r.MessageAllWorkersRunning.format(num_nodes=num_nodes)
        plan.transition(c.PhaseRunning, "Normal", r.ReasonAllWorkersRunning, message)
        plan.condition(r.ConditionRunning, True, r.ReasonAllWorkersRunning, message)
        if plan.has_condition(r.ConditionRestarting):
            plan.condition(r.ConditionRestarting, False, r.ReasonAllWorkersRunning, message)
        return
    message = r.MessageWaitingForPods.format(running=running, num_nodes=num_nodes)
    stuck = next((p for p in sorted(current, key=lambda p: p.rank) if p.waiting), None)
    if stuck is not None:  # say why, instead of an unexplained Pending
        message = f"{message}; {stuck.name}: {stuck.waiting}"[: r.MAX_MESSAGE]
    plan.condition(r.ConditionRunning, False, r.ReasonWaitingForPods, message)
