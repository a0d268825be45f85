"""QuantizeJob status decisions: the Job and its pod in, status + Events + actions out (no cluster)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus, QuantizeResult
from lmforge.operator.builders.quantizejob_status import (
    INTERVAL_SECONDS,
    JobView,
    Observed,
    QuantizePod,
    decide,
    human_size,
    parse_result,
)
from lmforge.operator.decision import Apply, Create, Decision, invalid_spec
from lmforge.operator.decision import Event as StatusEvent

JOB_OBJECT = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "q", "namespace": "ns"}}
SERVE_OBJECT = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat"},
}

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=30)
CREATED = Condition(
    type="Created",
    status="True",
    reason="JobCreated",
    message="created Job q: one pod runs `lmforge quantize --method w4a16-rtn`",
    last_transition_time=T0,
    observed_generation=1,
)
REPORT = {
    "sizeBytesBefore": 1577616,
    "sizeBytesAfter": 567024,
    "klDivergence": 0.00123,
    "top1Agreement": 0.951,
    "outputPath": "/mnt/pvc/models/out",
}
RESULT = QuantizeResult(
    size_bytes_before=1577616,
    size_bytes_after=567024,
    kl_divergence=0.00123,
    top1_agreement=0.951,
    output_path="pvc://models/out",
)


def spec(**overrides: Any) -> QuantizeJobSpec:
    return QuantizeJobSpec.model_validate(
        {"model": "pvc://models/in", "method": "w4a16-rtn", "output": "pvc://models/out", **overrides}
    )


def pod(phase: str, **kwargs: Any) -> QuantizePod:
    return QuantizePod(
        name="q-abcde", phase=phase, created_at=T0 + timedelta(seconds=1), node="node-0", **kwargs
    )


def observe(
    status: QuantizeJobStatus | None = None,
    job: JobView | None = JobView("q"),
    pods: tuple[QuantizePod, ...] = (),
    now: datetime = NOW,
    served: bool = False,
    **spec_overrides: Any,
) -> Decision:
    quantize = spec(**spec_overrides)
    return decide(
        Observed(
            name="q",
            generation=1,
            spec=quantize,
            status=status or QuantizeJobStatus(),
            job=job,
            pods=pods,
            now=now,
            job_object=JOB_OBJECT,
            serve_object=SERVE_OBJECT if quantize.serve_after else None,
            served=served,
        )
    )


def created(**fields: Any) -> QuantizeJobStatus:
    return QuantizeJobStatus(phase="Pending", conditions=[CREATED], observed_generation=1, **fields)


def test_a_new_job_creates_its_job():
    condition = CREATED.model_copy(update={"last_transition_time": NOW})
    assert observe(job=None) == Decision(
        status=QuantizeJobStatus(phase="Pending", conditions=[condition], observed_generation=1),
        events=(StatusEvent("Normal", "JobCreated", CREATED.message),),
        actions=(Create(JOB_OBJECT),),
        requeue_after=INTERVAL_SECONDS,
    )


def test_a_job_not_seen_yet_is_created_again_then_reported_gone():
    """Status first, then the create: a create that did not go through is made again (same name:
    AlreadyExists at worst) until the grace runs out."""
    waiting = observe(created(), job=None, now=T0 + timedelta(seconds=59))
    assert waiting == Decision(created(), actions=(Create(JOB_OBJECT),), requeue_after=INTERVAL_SECONDS)
    started = created(start_time=T0)  # a pod was seen once: the Job existed, it is not made again
    assert observe(started, job=None, now=T0 + timedelta(seconds=59)).actions == ()
    decision = observe(created(), job=None, now=T0 + timedelta(seconds=61))
    assert decision.status.phase == "Failed" and decision.actions == ()
    assert decision.events == (StatusEvent("Warning", "JobDeleted", "Job q disappeared before it finished"),)


def test_pending_pod_says_why():
    decision = observe(created(), pods=(pod("Pending", waiting="ImagePullBackOff: back-off pulling"),))
    assert decision.status.phase == "Pending" and decision.events == ()
    running = next(c for c in decision.status.conditions if c.type == "Running")
    assert (running.status, running.reason, running.message) == (
        "False",
        "PodPending",
        "waiting for the quantization pod to start (ImagePullBackOff: back-off pulling)",
    )
    assert decision.status.start_time == T0 + timedelta(seconds=1)


def test_running_pod():
    decision = observe(created(), pods=(pod("Running"),))
    assert decision.status.phase == "Running"
    assert decision.events == (StatusEvent("Normal", "PodRunning", "pod q-abcde is quantizing (w4a16-rtn)"),)
    again = observe(decision.status, pods=(pod("Running"),), now=NOW + timedelta(seconds=3))
    assert again == Decision(decision.status, requeue_after=INTERVAL_SECONDS)  # steady: writes, posts nothing


def test_success_folds_the_result_and_serves():
    running = observe(created(), pods=(pod("Running"),)).status
    done = pod("Succeeded", exit_code=0, finished_at=NOW, result=json.dumps(REPORT))
    decision = observe(running, pods=(done,), serveAfter={"name": "chat", "replicas": 2})
    assert decision.actions == (Apply(SERVE_OBJECT),) and decision.requeue_after == 0.0
    assert decision.status.inference_service is None  # named only once the apply went through
    assert decision.events == (
        StatusEvent(
            "Normal",
            "QuantizationSucceeded",
            "wrote pvc://models/out: 553.7KiB (from 1.5MiB), KL 0.00123, top-1 agreement 95.1%",
        ),
    )
    decision = observe(decision.status, pods=(done,), serveAfter={"name": "chat", "replicas": 2}, served=True)
    status = decision.status
    assert (status.phase, status.result, status.size, status.completion_time) == (
        "Succeeded",
        RESULT,
        "553.7KiB (from 1.5MiB)",
        NOW,
    )
    assert status.inference_service == "chat" and decision.actions == () and decision.requeue_after is None
    assert {c.type: (c.status, c.reason) for c in status.conditions} == {
        "Created": ("True", "JobCreated"),
        "Running": ("False", "QuantizationSucceeded"),
        "Succeeded": ("True", "QuantizationSucceeded"),
    }
    assert decision.events == (
        StatusEvent(
            "Normal",
            "InferenceServiceCreated",
            "InferenceService chat serves pvc://models/out (2 replica(s))",
        ),
    )
    # terminal: nothing changes any more, whatever the pod does; the InferenceService is not re-applied
    later = observe(status, pods=(pod("Failed", exit_code=1),), serveAfter={"name": "chat"})
    assert later == Decision(status, requeue_after=None)


def test_success_after_a_failed_serve_retries_the_serve():
    status = observe(created(), pods=(pod("Succeeded", exit_code=0, finished_at=NOW),)).status
    assert status.phase == "Succeeded" and status.result == QuantizeResult(output_path="pvc://models/out")
    decision = observe(status, serveAfter={"name": "chat"})  # e.g. after an operator restart
    assert decision.actions == (Apply(SERVE_OBJECT),) and decision.status.inference_service is None


def test_pod_failure_is_terminal_with_the_runtime_message():
    message = "w4a16-gptq needs calibration data: pass --calibration FILE.jsonl\n"
    failed = pod("Failed", exit_code=2, reason="Error", message=message, finished_at=NOW)
    decision = observe(created(), pods=(failed,))
    status = decision.status
    assert status.phase == "Failed" and decision.actions == () and decision.requeue_after is None
    assert status.last_failure == LastFailure(
        pod="q-abcde", node="node-0", exit_code=2, reason="Error", message=message.strip(), time=NOW
    )
    text = (
        "pod q-abcde failed (exit code 2, Error, node node-0): w4a16-gptq needs calibration data: "
        "pass --calibration FILE.jsonl"
    )
    assert decision.events == (StatusEvent("Warning", "PodFailed", text),)
    assert next(c for c in status.conditions if c.type == "Failed").reason == "PodFailed"
    assert observe(status, pods=(pod("Succeeded"),)) == Decision(status, requeue_after=None)  # terminal


@pytest.mark.parametrize(
    "job, reason, message",
    [
        pytest.param(
            JobView("q", failed=True, failed_reason="DeadlineExceeded"),
            "DeadlineExceeded",
            "the job ran longer than activeDeadlineSeconds=60",
            id="deadline",
        ),
        pytest.param(
            JobView("q", failed=True, failed_reason="BackoffLimitExceeded", failed_message="pod deleted"),
            "JobFailed",
            "Job q failed: BackoffLimitExceeded (pod deleted)",
            id="other",
        ),
    ],
)
def test_job_failure(job, reason, message):
    decision = observe(created(), job=job, pods=(pod("Running"),), activeDeadlineSeconds=60)
    assert decision.status.phase == "Failed"
    assert decision.events == (StatusEvent("Warning", reason, message),)


def test_complete_job_without_a_pod_still_succeeds():
    decision = observe(created(), job=JobView("q", complete=True))
    assert decision.status.phase == "Succeeded" and decision.status.completion_time == NOW


def test_invalid_spec_fails_once():
    decision = invalid_spec(QuantizeJobStatus(), 3, "model 's3://b/m': unsupported", NOW)
    assert decision.status.phase == "Failed" and decision.status.observed_generation == 3
    assert decision.status.completion_time == NOW and decision.requeue_after is None
    failed = next(c for c in decision.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason, failed.message) == (
        "True",
        "InvalidSpec",
        "model 's3://b/m': unsupported",
    )
    assert decision.events == (StatusEvent("Warning", "InvalidSpec", "model 's3://b/m': unsupported"),)
    assert invalid_spec(decision.status, 4, "other", NOW) == Decision(decision.status, requeue_after=None)


@pytest.mark.parametrize(
    "raw",
    [None, "not json", "[1, 2]", '{"sizeBytesAfter": "many"}'],
    ids=["absent", "garbage", "a-list", "bad-type"],
)
def test_a_bad_result_annotation_only_loses_the_numbers(raw):
    assert parse_result(raw, "pvc://x/y") == QuantizeResult(output_path="pvc://x/y")


@pytest.mark.parametrize(
    "num_bytes, text",
    [
        (512, "512B"),
        (1536, "1.5KiB"),
        (567024, "553.7KiB"),
        (4187593113, "3.9GiB"),
        (15 * 1024**4, "15.0TiB"),
    ],
)
def test_human_size(num_bytes, text):
    assert human_size(num_bytes) == text
