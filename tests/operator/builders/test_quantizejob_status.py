"""QuantizeJob status decisions: the Job and its pod in, status + Events + actions out (no cluster)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lmforge.operator.api.base import Condition, LastFailure
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus, QuantizeResult
from lmforge.operator.builders.quantizejob_status import (
    Decision,
    JobView,
    Observed,
    QuantizePod,
    StatusEvent,
    decide,
    human_size,
    invalid,
    parse_result,
)

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
    **spec_overrides: Any,
) -> Decision:
    return decide(
        Observed(
            name="q",
            generation=1,
            spec=spec(**spec_overrides),
            status=status or QuantizeJobStatus(),
            job=job,
            pods=pods,
            now=now,
        )
    )


def created(**fields: Any) -> QuantizeJobStatus:
    return QuantizeJobStatus(phase="Pending", conditions=[CREATED], observed_generation=1, **fields)


def test_a_new_job_creates_its_job():
    condition = CREATED.model_copy(update={"last_transition_time": NOW})
    assert observe(job=None) == Decision(
        status=QuantizeJobStatus(phase="Pending", conditions=[condition], observed_generation=1),
        create_job=True,
        events=(StatusEvent("Normal", "JobCreated", CREATED.message),),
    )


def test_a_job_not_seen_yet_is_waited_for_then_reported_gone():
    assert observe(created(), job=None, now=T0 + timedelta(seconds=59)) == Decision(created())
    decision = observe(created(), job=None, now=T0 + timedelta(seconds=61))
    assert decision.status.phase == "Failed" and not decision.create_job
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
    assert again == Decision(decision.status)  # a steady state writes and posts nothing


def test_success_folds_the_result_and_serves():
    running = observe(created(), pods=(pod("Running"),)).status
    done = pod("Succeeded", exit_code=0, finished_at=NOW, result=json.dumps(REPORT))
    decision = observe(running, pods=(done,), serveAfter={"name": "chat", "replicas": 2})
    status = decision.status
    assert (status.phase, status.result, status.size, status.completion_time) == (
        "Succeeded",
        RESULT,
        "553.7KiB (from 1.5MiB)",
        NOW,
    )
    assert status.inference_service == "chat" and decision.serve
    assert {c.type: (c.status, c.reason) for c in status.conditions} == {
        "Created": ("True", "JobCreated"),
        "Running": ("False", "QuantizationSucceeded"),
        "Succeeded": ("True", "QuantizationSucceeded"),
    }
    assert decision.events == (
        StatusEvent(
            "Normal",
            "QuantizationSucceeded",
            "wrote pvc://models/out: 553.7KiB (from 1.5MiB), KL 0.00123, top-1 agreement 95.1%",
        ),
        StatusEvent(
            "Normal",
            "InferenceServiceCreated",
            "InferenceService chat serves pvc://models/out (2 replica(s))",
        ),
    )
    # terminal: nothing changes any more, whatever the pod does; the InferenceService is not re-applied
    later = observe(status, pods=(pod("Failed", exit_code=1),), serveAfter={"name": "chat"})
    assert later == Decision(status)


def test_success_after_a_failed_serve_retries_the_serve():
    status = observe(created(), pods=(pod("Succeeded", exit_code=0, finished_at=NOW),)).status
    assert status.phase == "Succeeded" and status.result == QuantizeResult(output_path="pvc://models/out")
    decision = observe(status, serveAfter={"name": "chat"})
    assert decision.serve and decision.status.inference_service == "chat"


def test_pod_failure_is_terminal_with_the_runtime_message():
    message = "w4a16-gptq needs calibration data: pass --calibration FILE.jsonl\n"
    failed = pod("Failed", exit_code=2, reason="Error", message=message, finished_at=NOW)
    decision = observe(created(), pods=(failed,))
    status = decision.status
    assert status.phase == "Failed" and not decision.serve
    assert status.last_failure == LastFailure(
        pod="q-abcde", node="node-0", exit_code=2, reason="Error", message=message.strip(), time=NOW
    )
    text = (
        "pod q-abcde failed (exit code 2, Error, node node-0): w4a16-gptq needs calibration data: "
        "pass --calibration FILE.jsonl"
    )
    assert decision.events == (StatusEvent("Warning", "PodFailed", text),)
    assert next(c for c in status.conditions if c.type == "Failed").reason == "PodFailed"
    assert observe(status, pods=(pod("Succeeded"),)) == Decision(status)  # terminal


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
    decision = invalid(QuantizeJobStatus(), 3, "model 's3://b/m': unsupported", NOW)
    assert decision.status.phase == "Failed" and decision.status.observed_generation == 3
    assert decision.events == (StatusEvent("Warning", "InvalidSpec", "model 's3://b/m': unsupported"),)
    assert invalid(decision.status, 4, "other", NOW) == Decision(decision.status)


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
