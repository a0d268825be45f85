"""The TrainJob state machine (`decide`): one test per path, plus the exit-code table."""

from __future__ import annotations

import json

import pytest

from lmforge.devcluster.factories import (
    T0,
    at,
    created_ranks,
    deleted_pods,
    deletes_job,
    force_deleted_pods,
    make_spec,
    observed,
    pod_dict,
    worker,
    workers,
)
from lmforge.operator.api.base import Condition
from lmforge.operator.api.trainjob import FailurePolicy, Progress, TrainJobStatus
from lmforge.operator.builders.trainjob_pods import WorkerPod, fold_progress, format_duration
from lmforge.operator.builders.trainjob_policy import (
    backoff_seconds,
    creation_failed,
    decide,
    is_retryable,
)
from lmforge.operator.decision import RESYNC_SECONDS, Event

NAMES = ("llama-0", "llama-1", "llama-2", "llama-3")


CREATED = [
    Condition(
        type="Created",
        status="True",
        reason="GangCreated",
        message="created 4 worker pods (attempt 0)",
        last_transition_time=T0,
    )
]


def running_status(**fields) -> TrainJobStatus:
    return TrainJobStatus(phase="Running", start_time=T0, **{"conditions": CREATED, **fields})


def conditions(status: TrainJobStatus) -> dict[str, tuple[str, str]]:
    return {cond.type: (cond.status, cond.reason) for cond in status.conditions}


# --- creating and tracking the gang ---------------------------------------------------------------


def test_new_job_creates_the_whole_gang() -> None:
    d = decide(observed())
    assert created_ranks(d) == (0, 1, 2, 3)
    assert (d.status.phase, d.status.start_time, d.status.restarts, d.status.observed_generation) == (
        "Pending",
        T0,
        0,
        1,
    )
    assert conditions(d.status) == {"Created": ("False", "CreatingPods")}  # not before the pods exist
    assert d.events == ()
    assert (deleted_pods(d), force_deleted_pods(d), deletes_job(d)) == ((), (), False)


def test_created_once_every_pod_exists() -> None:
    first = decide(observed())
    d = decide(observed(status=first.status, pods=workers(4, phase="Pending"), now=at(1)))
    assert created_ranks(d) == ()
    assert conditions(d.status)["Created"] == ("True", "GangCreated")
    assert d.events == (Event("Normal", "GangCreated", "created 4 worker pods (attempt 0)"),)
    again = decide(observed(status=d.status, pods=workers(4, phase="Pending"), now=at(2)))
    assert again.events == ()


def test_refused_pod_creation_names_the_service_account_once() -> None:
    first = decide(observed())
    error = 'pods "llama-0" is forbidden: error looking up service account team-a/trainer: serviceaccount "trainer" not found'
    status, event = creation_failed(first.status, 1, at(1), "llama-0", 403, error, "trainer", "team-a")
    assert conditions(status)["Created"] == ("False", "ServiceAccountMissing")
    assert event is not None and event.reason == "ServiceAccountMissing" and "'trainer'" in event.message
    retry = decide(observed(status=status, now=at(6)))  # still no pods: creates again, keeps the cause
    assert created_ranks(retry) == (0, 1, 2, 3) and retry.events == ()
    assert conditions(retry.status)["Created"] == ("False", "ServiceAccountMissing")
    again, second = creation_failed(retry.status, 1, at(6), "llama-0", 403, error, "trainer", "team-a")
    assert second is None and again == retry.status  # one Event per cause


def test_refused_pod_creation_without_a_service_account() -> None:
    status, event = creation_failed(
        TrainJobStatus(), 1, T0, "llama-0", 403, "forbidden: exceeded quota", None, "ns"
    )
    assert conditions(status)["Created"] == ("False", "PodCreationFailed")
    assert (
        event is not None
        and event.message == "the API server refused worker pod llama-0: 403 forbidden: exceeded quota"
    )


def test_a_gang_of_an_older_spec_is_replaced_and_not_observed() -> None:
    pods = [worker(r, spec_hash="old") for r in range(4)]
    d = decide(
        observed(status=running_status(observed_generation=1), pods=pods, generation=3, spec_hash="new")
    )
    assert (d.status.phase, deleted_pods(d), created_ranks(d)) == ("Pending", NAMES, ())
    assert d.status.restarts == 0 and d.status.observed_generation == 1  # not a failure; not observed yet
    assert [e.reason for e in d.events] == ["SpecChanged"]
    same = decide(observed(status=running_status(), pods=pods, generation=3, spec_hash="old"))
    assert (deleted_pods(same), same.status.observed_generation) == ((), 3)


def test_operator_killed_mid_creation_creates_only_the_missing_ranks() -> None:
    status = TrainJobStatus(phase="Pending", start_time=T0)
    d = decide(
        observed(status=status, pods=[worker(0, phase="Pending"), worker(2, phase="Pending")], now=at(1))
    )
    assert created_ranks(d) == (1, 3)
    assert d.events == ()
    assert d.status.start_time == T0


def test_pending_pods_keep_the_job_pending() -> None:
    d = decide(
        observed(status=TrainJobStatus(phase="Pending", start_time=T0), pods=workers(4, phase="Pending"))
    )
    assert (d.status.phase, created_ranks(d)) == ("Pending", ())
    assert conditions(d.status)["Running"] == ("False", "WaitingForPods")
    assert d.status.replicas.active == 4


def test_waiting_condition_says_why_pods_do_not_run() -> None:
    pods = [
        worker(
            0, phase="Pending", waiting="Unschedulable: 0/4 nodes are available: Insufficient nvidia.com/gpu"
        ),
        *workers(4)[1:],
    ]
    d = decide(observed(status=TrainJobStatus(phase="Pending", start_time=T0), pods=pods))
    running = {cond.type: cond for cond in d.status.conditions}["Running"]
    assert running.message == (
        "3/4 worker pods running; llama-0: Unschedulable: 0/4 nodes are available: "
        "Insufficient nvidia.com/gpu"
    )


def test_all_workers_running_makes_the_job_running() -> None:
    d = decide(
        observed(
            status=TrainJobStatus(phase="Pending", start_time=T0, conditions=CREATED),
            pods=workers(4),
            now=at(5),
        )
    )
    assert d.status.phase == "Running"
    assert conditions(d.status)["Running"] == ("True", "AllWorkersRunning")
    assert d.events == (Event("Normal", "AllWorkersRunning", "all 4 worker pods are running"),)
    assert d.requeue_after == RESYNC_SECONDS


def test_a_steady_running_job_changes_nothing() -> None:
    first = decide(observed(status=TrainJobStatus(phase="Pending", start_time=T0), pods=workers(4)))
    again = decide(observed(status=first.status, pods=workers(4), now=at(30)))
    assert again.status == first.status
    assert (again.events, created_ranks(again), deleted_pods(again)) == ((), (), ())


def test_progress_of_rank0_is_folded_into_status() -> None:
    report = json.dumps(
        {
            "step": 120,
            "totalSteps": 1000,
            "loss": 1.25,
            "tokensPerSecond": 5120.5,
            "etaSeconds": 3725,
            "epoch": 0.4,
            "lastCheckpoint": "/ckpt/step-100",
        }
    )
    pods = [worker(0, progress=report), *workers(4)[1:]]
    d = decide(observed(status=running_status(), pods=pods, now=at(10)))
    assert d.status.progress == Progress(
        step=120,
        total_steps=1000,
        summary="120/1000",
        epoch=0.4,
        loss=1.25,
        tokens_per_second=5120.5,
        eta_seconds=3725,
        eta="1h2m",
        last_checkpoint="/ckpt/step-100",
        update_time=at(10),
    )
    same = decide(observed(status=d.status, pods=pods, now=at(20)))
    assert same.status.progress.update_time == at(10)  # unchanged report: nothing to write


# --- success, failure, restart ----------------------------------------------------------------------


def test_rank0_exit_0_succeeds_and_tears_down_the_others() -> None:
    pods = [worker(0, phase="Succeeded", exit_code=0), *workers(4)[1:]]
    d = decide(observed(status=running_status(), pods=pods, now=at(100)))
    assert (d.status.phase, d.status.completion_time) == ("Succeeded", at(100))
    assert deleted_pods(d) == NAMES[1:]
    assert conditions(d.status)["Succeeded"] == ("True", "AllWorkersSucceeded")
    assert d.events == (Event("Normal", "AllWorkersSucceeded", "rank 0 exited 0: training finished"),)


def test_ranks_above_0_finishing_first_is_not_success_yet() -> None:
    pods = [*workers(2), worker(2, phase="Succeeded", exit_code=0), worker(3, phase="Succeeded", exit_code=0)]
    d = decide(observed(status=running_status(), pods=pods))
    assert d.status.phase == "Running"
    assert (deleted_pods(d), d.events) == ((), ())


def test_oom_killed_worker_restarts_the_gang() -> None:
    pods = [
        *workers(3),
        worker(3, phase="Failed", exit_code=137, reason="OOMKilled", node="n3", finished_at=at(50)),
    ]
    d = decide(observed(status=running_status(), pods=pods, now=at(51)))
    assert (d.status.phase, d.status.restarts, d.status.last_restart_time) == ("Restarting", 1, at(51))
    assert deleted_pods(d) == NAMES
    assert created_ranks(d) == ()
    assert d.status.last_failure.model_dump(exclude_none=True) == {
        "pod": "llama-3",
        "node": "n3",
        "exit_code": 137,
        "reason": "OOMKilled",
        "time": at(50),
    }
    assert conditions(d.status)["Restarting"] == ("True", "RetryableFailure")
    assert d.events == (
        Event(
            "Warning",
            "RetryableFailure",
            "pod llama-3 failed (exit code 137, OOMKilled, node n3); restarting the gang, attempt 1 of 3",
        ),
    )
    assert d.requeue_after == 10


def test_the_earliest_failure_is_the_root_cause() -> None:
    """rank 2 is OOM-killed; rank 0 then dies of an NCCL error (exit 1): restart, not fail."""
    pods = [
        worker(0, phase="Failed", exit_code=1, finished_at=at(20)),
        worker(1),
        worker(2, phase="Failed", exit_code=137, finished_at=at(10)),
        worker(3),
    ]
    d = decide(observed(status=running_status(), pods=pods, now=at(21)))
    assert (d.status.phase, d.status.last_failure.pod) == ("Restarting", "llama-2")


def test_app_error_fails_the_job_with_last_failure() -> None:
    spec = make_spec(numNodes=4, failurePolicy={"maxRestarts": 0})
    pods = [*workers(3), worker(3, phase="Failed", exit_code=1, reason="Error", node="n3", finished_at=at(7))]
    d = decide(observed(spec=spec, status=running_status(), pods=pods, now=at(8)))
    assert (d.status.phase, d.status.completion_time, d.status.restarts) == ("Failed", at(8), 0)
    assert (d.status.last_failure.pod, d.status.last_failure.exit_code) == ("llama-3", 1)
    assert conditions(d.status)["Failed"] == ("True", "NonRetryableExitCode")
    assert deleted_pods(d) == NAMES[:3]  # the failed pod stays for `kubectl logs`
    assert d.events[0].message == (
        "pod llama-3 failed (exit code 1, Error, node n3): not retryable under spec.failurePolicy"
    )


def test_retryable_failure_after_max_restarts_fails_the_job() -> None:
    spec = make_spec(numNodes=4, failurePolicy={"maxRestarts": 2})
    pods = [*workers(3, attempt=2), worker(3, attempt=2, phase="Failed", exit_code=143)]
    d = decide(observed(spec=spec, status=running_status(restarts=2), pods=pods))
    assert (d.status.phase, d.status.restarts) == ("Failed", 2)
    assert conditions(d.status)["Failed"] == ("True", "MaxRestartsExceeded")


@pytest.mark.parametrize(
    ("policy", "exit_code", "phase"),
    [
        pytest.param({"failOnExitCodes": [137]}, 137, "Failed", id="fail-list-beats-signal"),
        pytest.param({"restartOnExitCodes": [3]}, 3, "Restarting", id="restart-list-beats-app-error"),
    ],
)
def test_exit_code_lists(policy, exit_code, phase) -> None:
    spec = make_spec(numNodes=4, failurePolicy=policy)
    pods = [*workers(3), worker(3, phase="Failed", exit_code=exit_code)]
    assert decide(observed(spec=spec, status=running_status(), pods=pods)).status.phase == phase


def test_a_pod_vanishing_under_a_running_gang_restarts_it() -> None:
    d = decide(observed(status=running_status(), pods=workers(4)[:3], now=at(9)))
    assert (d.status.phase, d.status.restarts, d.status.last_failure.pod) == ("Restarting", 1, "llama-3")
    assert d.status.last_failure.reason == "PodDeleted"


def test_restart_waits_for_the_backoff() -> None:
    status = TrainJobStatus(phase="Restarting", restarts=2, start_time=T0, last_restart_time=at(100))
    d = decide(observed(status=status, now=at(105)))  # backoff for restart 2: 10 * 2 = 20 s
    assert created_ranks(d) == ()
    assert d.requeue_after == 15


def test_after_the_backoff_a_new_gang_is_created() -> None:
    status = TrainJobStatus(phase="Restarting", restarts=1, start_time=T0, last_restart_time=at(100))
    d = decide(observed(status=status, now=at(111)))
    assert created_ranks(d) == (0, 1, 2, 3)
    assert d.events == ()
    d = decide(observed(status=d.status, pods=workers(4, attempt=1, phase="Pending"), now=at(112)))
    assert d.events == (Event("Normal", "GangRestarted", "recreated 4 worker pods (attempt 1)"),)


def test_stale_pods_are_deleted_before_the_new_gang() -> None:
    status = TrainJobStatus(phase="Restarting", restarts=1, start_time=T0, last_restart_time=T0)
    pods = [worker(0, attempt=0), worker(1, attempt=0, phase="Failed", exit_code=137)]
    d = decide(observed(status=status, pods=pods, now=at(60)))
    assert (deleted_pods(d), created_ranks(d)) == (("llama-0", "llama-1"), ())
    assert d.requeue_after == 1.0


def test_the_new_gang_running_clears_restarting() -> None:
    first = decide(observed(status=running_status(), pods=workers(4)[:3]))
    d = decide(observed(status=first.status, pods=workers(4, attempt=1), now=at(60)))
    assert d.status.phase == "Running"
    assert conditions(d.status)["Restarting"] == ("False", "AllWorkersRunning")


# --- suspend, deadline, TTL, stuck pods ---------------------------------------------------------------


def test_suspend_deletes_pods_and_clears_the_start_time() -> None:
    d = decide(observed(spec=make_spec(numNodes=4, suspend=True), status=running_status(), pods=workers(4)))
    assert (d.status.phase, d.status.start_time, deleted_pods(d)) == ("Suspended", None, NAMES)
    assert conditions(d.status)["Suspended"] == ("True", "JobSuspended")
    assert [e.reason for e in d.events] == ["JobSuspended"]


def test_created_suspended_never_creates_pods() -> None:
    d = decide(observed(spec=make_spec(numNodes=4, suspend=True)))
    assert (d.status.phase, created_ranks(d)) == ("Suspended", ())


def test_resume_recreates_the_gang() -> None:
    status = TrainJobStatus(phase="Suspended", restarts=1)
    d = decide(observed(status=status, now=at(30)))
    assert (d.status.phase, d.status.start_time, created_ranks(d)) == ("Pending", at(30), (0, 1, 2, 3))
    assert [e.reason for e in d.events] == ["JobResumed"]  # GangRestarted once the pods exist
    assert conditions(d.status)["Suspended"] == ("False", "JobResumed")


def test_resume_waits_for_terminating_pods() -> None:
    pods = [worker(0, deletion_timestamp=at(10))]
    d = decide(observed(status=TrainJobStatus(phase="Suspended"), pods=pods, now=at(5)))
    assert (d.status.phase, created_ranks(d)) == ("Pending", ())


def test_active_deadline_fails_the_job() -> None:
    spec = make_spec(numNodes=4, activeDeadlineSeconds=600)
    early = decide(observed(spec=spec, status=running_status(), pods=workers(4), now=at(100)))
    assert (early.status.phase, early.requeue_after) == ("Running", RESYNC_SECONDS)
    late = decide(observed(spec=spec, status=running_status(), pods=workers(4), now=at(600)))
    assert late.status.phase == "Failed"
    assert conditions(late.status)["Failed"] == ("True", "DeadlineExceeded")
    assert deleted_pods(late) == NAMES


def test_terminal_phase_never_changes() -> None:
    status = TrainJobStatus(phase="Succeeded", start_time=T0, completion_time=at(10))
    pods = [worker(0, phase="Succeeded", exit_code=0), worker(1, phase="Failed", exit_code=137)]
    d = decide(observed(spec=make_spec(numNodes=2, suspend=True), status=status, pods=pods, now=at(20)))
    assert (d.status.phase, d.status.restarts, created_ranks(d), deleted_pods(d), d.events) == (
        "Succeeded",
        0,
        (),
        (),
        (),
    )


@pytest.mark.parametrize(
    ("now", "delete_job", "requeue"),
    [
        pytest.param(at(40), False, 30.0, id="not-yet"),
        pytest.param(at(70), True, None, id="expired"),
    ],
)
def test_ttl_after_finished(now, delete_job, requeue) -> None:
    spec = make_spec(numNodes=2, ttlSecondsAfterFinished=60)
    status = TrainJobStatus(phase="Failed", completion_time=at(10))
    pods = [worker(0, phase="Failed", exit_code=1), worker(1, phase="Failed", exit_code=1)]
    d = decide(observed(spec=spec, status=status, pods=pods, now=now))
    assert (deletes_job(d), d.requeue_after) == (delete_job, requeue)
    assert deleted_pods(d) == (("llama-0", "llama-1") if delete_job else ())


def test_stuck_terminating_pod_is_force_deleted() -> None:
    status = TrainJobStatus(phase="Restarting", restarts=1, start_time=T0, last_restart_time=T0)
    pods = [worker(0, attempt=0, deletion_timestamp=at(30)), worker(1, attempt=0, deletion_timestamp=at(100))]
    d = decide(observed(status=status, pods=pods, now=at(95)))  # forceDeleteAfterSeconds: 60
    assert force_deleted_pods(d) == ("llama-0",)
    assert d.events == (
        Event(
            "Warning",
            "StuckPodForceDeleted",
            "pod llama-0 was Terminating for 65s past its grace period; force-deleted",
        ),
    )
    assert created_ranks(d) == ()


# --- pure helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "policy", "retryable"),
    [
        pytest.param(1, {}, False, id="1-app-error"),
        pytest.param(127, {}, False, id="127-command-not-found"),
        pytest.param(128, {}, True, id="128"),
        pytest.param(137, {}, True, id="137-oom-sigkill"),
        pytest.param(143, {}, True, id="143-sigterm"),
        pytest.param(None, {}, True, id="no-exit-code-evicted"),
        pytest.param(1, {"restart_on_exit_codes": [1]}, True, id="restart-list"),
        pytest.param(143, {"fail_on_exit_codes": [143]}, False, id="fail-list"),
    ],
)
def test_is_retryable(exit_code, policy, retryable) -> None:
    pod = WorkerPod(name="p", rank=0, attempt=0, phase="Failed", exit_code=exit_code)
    assert is_retryable(FailurePolicy(**policy), pod) is retryable


@pytest.mark.parametrize(("restarts", "seconds"), [(0, 0), (1, 10), (2, 20), (3, 40), (10, 600)])
def test_backoff_doubles_and_caps(restarts, seconds) -> None:
    assert backoff_seconds(FailurePolicy(), restarts) == seconds


@pytest.mark.parametrize(("seconds", "text"), [(9, "9s"), (75, "1m15s"), (3725, "1h2m"), (90000, "1d1h")])
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"step": "x"}'], ids=["garbage", "list", "bad-type"])
def test_bad_progress_keeps_the_last_report(raw) -> None:
    last = Progress(step=5, total_steps=10, summary="5/10", update_time=T0)
    assert fold_progress(last, raw, at(1)) is last


def test_worker_pod_from_api_object() -> None:
    raw = pod_dict(
        2,
        attempt=1,
        phase="Failed",
        exit_code=137,
        annotations={"lmforge.dev/progress": "{}"},
        deletion_timestamp="2025-01-01T12:01:00Z",
    )
    assert WorkerPod.from_pod(raw) == WorkerPod(
        name="llama-2",
        rank=2,
        attempt=1,
        phase="Failed",
        ready=False,
        exit_code=137,
        reason="Error",
        node="kwok-node-0",
        finished_at=at(300),
        deletion_timestamp=at(60),
        progress="{}",
    )
    assert WorkerPod.from_pod({"metadata": {"name": "x", "labels": {}}}) is None
    pending = pod_dict(0, phase="Pending")
    pending["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": 'persistentvolumeclaim "models" not found',
        }
    ]
    assert WorkerPod.from_pod(pending).waiting == 'Unschedulable: persistentvolumeclaim "models" not found'
    pending["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull"}}}
    ]
    pending["status"]["conditions"] = []
    assert WorkerPod.from_pod(pending).waiting == "ErrImagePull"
