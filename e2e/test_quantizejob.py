"""QuantizeJob end to end on the local cluster: the real operator process (`lmforge operator run`)
against a real API server, with the real Job controller and kwok playing the kubelet (a Job's pod
completes by default; lmforge.dev/fate, passed from the QuantizeJob to the pod template, holds it
Running or fails it)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lmforge.devcluster.pipeline import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-quantizejob-{uuid.uuid4().hex[:6]}"  # fresh per session, even on a reused cluster
MODEL, OUTPUT = "/models/llama", "/out/llama-w4"  # plain paths (hostPath): kwok has no PVCs to bind


@pytest.fixture(scope="module")
def operator(cluster, operator_process) -> Iterator[OperatorProcess]:
    """`lmforge operator run --standalone` watching the module's namespace; its QuantizeJob timer
    every second, so that the tests see a pod's fate in seconds."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/quantizejobs.lmforge.dev",
        "crd/inferenceservices.lmforge.dev",
    )
    cluster.kubectl("create", "namespace", NAMESPACE)
    op = operator_process(
        namespace=NAMESPACE, env={"LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS": "1"}, name="quantizejob"
    )
    yield op
    # while the operator runs: kopf's finalizers (for the timers) need it to let the objects go
    cluster.kubectl("delete", "lmqj,lmisvc", "--all", "-n", NAMESPACE, "--timeout=60s", check=False)
    op.stop()
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


class QuantizeJobs:
    """kubectl shortcuts for QuantizeJobs in the test namespace."""

    def __init__(self, cluster, wait_for, operator: OperatorProcess) -> None:
        self.cluster, self.wait_for, self.operator = cluster, wait_for, operator

    def apply(self, name: str, annotations: dict[str, str] | None = None, **spec: Any) -> None:
        obj = {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "QuantizeJob",
            "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations or {}},
            "spec": {"model": MODEL, "method": "w4a16-rtn", "output": OUTPUT, **spec},
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.cluster.kubectl_json("get", "-n", NAMESPACE, kind, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get("quantizejob", name).get("status") or {}

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.cluster.kubectl_json(
            "get", "pods", "-n", NAMESPACE, "-l", f"lmforge.dev/quantizejob={name}"
        )["items"]

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout=timeout,
            message=lambda: f"{name} never reached {phase}: {self.status(name)}\n{self.operator.tail()}",
        )

    def wait_running_pod(self, name: str, timeout: float = 60) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pods = [p for p in self.pods(name) if p["status"].get("phase") == "Running"]
            return pods[0] if len(pods) == 1 else None

        return self.wait_for(
            running,
            timeout=timeout,
            message=lambda: f"{name}: no running pod: {self.pods(name)}\n{self.operator.tail()}",
        )

    def annotate_pod(self, pod: str, key: str, value: str) -> None:
        self.cluster.kubectl("annotate", "--overwrite", "-n", NAMESPACE, "pod", pod, f"{key}={value}")

    def events(self, name: str) -> list[str]:
        items = self.cluster.kubectl_json(
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind=QuantizeJob",
        )["items"]
        return [
            e["reason"]
            for e in sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        ]


@pytest.fixture
def jobs(cluster, wait_for, operator) -> QuantizeJobs:
    return QuantizeJobs(cluster, wait_for, operator)


def test_job_runs_reports_its_result_and_serves_the_output(jobs: QuantizeJobs, wait_for) -> None:
    jobs.apply(
        "llama-w4",
        annotations={"lmforge.dev/fate": "run"},
        method="w4a16-gptq",
        groupSize=64,
        calibration={"dataset": "/data/calib.jsonl", "samples": 16, "seqLen": 256},
        serveAfter={"name": "llama-w4-chat", "replicas": 1},
    )
    pod = jobs.wait_running_pod("llama-w4")
    owner = jobs.get("quantizejob", "llama-w4")
    job = jobs.get("job", "llama-w4")
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    container = pod["spec"]["containers"][0]
    assert container["command"] == [
        "lmforge",
        "quantize",
        "--model",
        MODEL,
        "--method",
        "w4a16-gptq",
        "--output",
        OUTPUT,
        "--group-size",
        "64",
        "--calibration",
        "/data/calib.jsonl",
        "--samples",
        "16",
        "--seq-len",
        "256",
    ]
    assert {
        m["mountPath"]: m.get("readOnly", False)
        for m in container["volumeMounts"]
        if not m["mountPath"].startswith("/var/run")
    } == {MODEL: True, "/data/calib.jsonl": True, OUTPUT: False}
    status = jobs.wait_phase("llama-w4", "Running")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Created": "True", "Running": "True"}
    assert status["observedGeneration"] == 1 and status["startTime"]

    # what `lmforge quantize` does at the end (runtime/quantize/report.py), then the pod exits 0
    report = {
        "sizeBytesBefore": 16060000000,
        "sizeBytesAfter": 5700000000,
        "klDivergence": 0.0123,
        "top1Agreement": 0.95,
        "outputPath": "/out/llama-w4",
    }
    jobs.annotate_pod(pod["metadata"]["name"], "lmforge.dev/result", json.dumps(report))
    jobs.annotate_pod(pod["metadata"]["name"], "lmforge.dev/fate", "succeed")
    status = jobs.wait_phase("llama-w4", "Succeeded")
    assert status["result"] == {**report, "outputPath": OUTPUT}
    assert status["size"] == "5.3GiB (from 15.0GiB)" and status["completionTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Created": "True",
        "Running": "False",
        "Succeeded": "True",
    }

    isvc = wait_for(
        lambda: jobs.get("inferenceservice", "llama-w4-chat"),
        timeout=30,
        message=lambda: f"serveAfter made no InferenceService\n{jobs.operator.tail()}",
    )
    assert isvc["spec"]["model"]["source"] == OUTPUT and isvc["spec"]["replicas"] == 1
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert jobs.wait_for(
        lambda: jobs.status("llama-w4").get("inferenceService") == "llama-w4-chat", timeout=30
    )
    wait_for(
        lambda: jobs.get("deployment", "llama-w4-chat"),
        timeout=30,
        message="the InferenceService controller did not pick the new service up",
    )
    table = jobs.cluster.kubectl("get", "lmqj", "-n", NAMESPACE, "llama-w4").stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "METHOD", "SIZE", "AGE"]
    assert table[1].split()[:6] == ["llama-w4", "Succeeded", "w4a16-gptq", "5.3GiB", "(from", "15.0GiB)"]
    # one-second timestamps: Events of the same second list in any order (a loaded machine posts
    # JobCreated and PodRunning within one), so only the set is checked
    events = jobs.events("llama-w4")
    assert sorted(events) == [
        "InferenceServiceCreated",
        "JobCreated",
        "PodRunning",
        "QuantizationSucceeded",
    ]


def test_a_job_pod_completes_by_default(jobs: QuantizeJobs) -> None:
    jobs.apply("plain", method="fp8")
    status = jobs.wait_phase("plain", "Succeeded")
    assert status["result"] == {"outputPath": OUTPUT}  # kwok's pod never ran the runtime: no numbers
    assert "inferenceService" not in status


def test_a_failing_pod_fails_the_job_for_good(jobs: QuantizeJobs) -> None:
    jobs.apply("broken", annotations={"lmforge.dev/fate": "fail-1"})
    status = jobs.wait_phase("broken", "Failed")
    failure = status["lastFailure"]
    assert (failure["exitCode"], failure["reason"]) == (1, "Error")
    assert failure["pod"].startswith("broken-")
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "PodFailed")
    assert failed["message"].startswith(f"pod {failure['pod']} failed (exit code 1, Error")
    assert "PodFailed" in jobs.events("broken")
    time.sleep(3)  # a few more timer passes
    assert jobs.status("broken")["phase"] == "Failed"  # terminal: never changes again


def test_an_unsupported_output_is_refused_at_admission(jobs: QuantizeJobs) -> None:
    obj = {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "to-s3", "namespace": NAMESPACE},
        "spec": {"model": MODEL, "method": "w4a16-rtn", "output": "gs://bucket/llama-w4"},
    }
    result = jobs.cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0 and "spec.output" in result.stderr and "must be pvc://" in result.stderr, (
        result.stderr
    )
    assert jobs.cluster.kubectl("get", "job", "-n", NAMESPACE, "to-s3", check=False).returncode != 0
