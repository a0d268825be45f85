"""Builders of a QuantizeJob's batch/v1 Job and its serveAfter InferenceService: whole objects."""

from __future__ import annotations

from typing import Any

import pytest

from lmforge.operator.api.quantizejob import QuantizeJobSpec
from lmforge.operator.builders.quantizejob import (
    BuildConfig,
    JobRef,
    UnsupportedLocation,
    inference_service,
    job,
    quantize_command,
    storage,
)

REF = JobRef(name="llama-w4", namespace="team-a", uid="uid-1")
OWNER = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "QuantizeJob",
    "name": "llama-w4",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "lmforge.dev/quantizejob": "llama-w4",
    "lmforge.dev/kind": "QuantizeJob",
    "app.kubernetes.io/managed-by": "lmforge-operator",
}
ENV = [
    {"name": "LMFORGE_QUANTIZEJOB", "value": "llama-w4"},
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
]


def make_spec(**overrides: Any) -> QuantizeJobSpec:
    return QuantizeJobSpec.model_validate(
        {
            "model": "pvc://models/llama",
            "method": "w4a16-gptq",
            "calibration": {"dataset": "pvc://data/calib.jsonl"},
            "output": "pvc://models/llama-w4",
            **overrides,
        }
    )


def test_job_whole_object():
    spec = make_spec(
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}},
        activeDeadlineSeconds=7200,
        ttlSecondsAfterFinished=600,
        nodeSelector={"gpu": "h100"},
        env=[{"name": "HF_TOKEN", "value": "x"}],
    )
    annotations = {"lmforge.dev/fate": "fail-1", "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    assert job(REF, spec, annotations, BuildConfig(service_account="lmforge-worker")) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "llama-w4", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER]},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 7200,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": LABELS, "annotations": {"lmforge.dev/fate": "fail-1"}},
                "spec": {
                    "restartPolicy": "Never",
                    "enableServiceLinks": False,
                    "containers": [
                        {
                            "name": "quantize",
                            "image": "ghcr.io/lmforge/runtime:0.1.0",
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "lmforge",
                                "quantize",
                                "--model",
                                "/mnt/pvc/models/llama",
                                "--method",
                                "w4a16-gptq",
                                "--output",
                                "/mnt/pvc/models/llama-w4",
                                "--calibration",
                                "/mnt/pvc/data/calib.jsonl",
                                "--samples",
                                "128",
                                "--seq-len",
                                "512",
                            ],
                            "env": [*ENV, {"name": "HF_TOKEN", "value": "x"}],
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [
                                {"name": "pvc-models", "mountPath": "/mnt/pvc/models"},
                                {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True},
                            ],
                            "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "64Gi"}},
                        }
                    ],
                    "volumes": [
                        {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
                        {
                            "name": "pvc-data",
                            "persistentVolumeClaim": {"claimName": "data", "readOnly": True},
                        },
                    ],
                    "serviceAccountName": "lmforge-worker",
                    "nodeSelector": {"gpu": "h100"},
                },
            },
        },
    }


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(
            {
                "model": "hostPath:///models/llama",
                "output": "/out/llama-w4",
                "calibration": None,
                "method": "w8a16",
            },
            (
                "/models/llama",
                "/out/llama-w4",
                None,
                [
                    {"name": "model", "hostPath": {"path": "/models/llama", "type": "Directory"}},
                    {"name": "output", "hostPath": {"path": "/out/llama-w4", "type": "DirectoryOrCreate"}},
                ],
                [
                    {"name": "model", "mountPath": "/models/llama", "readOnly": True},
                    {"name": "output", "mountPath": "/out/llama-w4"},
                ],
            ),
            id="host-paths",
        ),
        pytest.param(
            {"model": "hf://meta-llama/Llama-3.2-1B", "calibration": {"dataset": "/data/c.jsonl"}},
            (
                "hf://meta-llama/Llama-3.2-1B",
                "/mnt/pvc/models/llama-w4",
                "/data/c.jsonl",
                [
                    {"name": "calibration", "hostPath": {"path": "/data/c.jsonl", "type": "File"}},
                    {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
                ],
                [
                    {"name": "calibration", "mountPath": "/data/c.jsonl", "readOnly": True},
                    {"name": "pvc-models", "mountPath": "/mnt/pvc/models"},
                ],
            ),
            id="hf-model-downloaded",
        ),
        pytest.param(
            {
                "model": "pvc://models/llama",
                "calibration": {"dataset": "pvc://models/calib.jsonl"},
                "output": "pvc://out/x",
            },
            (
                "/mnt/pvc/models/llama",
                "/mnt/pvc/out/x",
                "/mnt/pvc/models/calib.jsonl",
                [
                    {
                        "name": "pvc-models",
                        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
                    },
                    {"name": "pvc-out", "persistentVolumeClaim": {"claimName": "out"}},
                ],
                [
                    {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True},
                    {"name": "pvc-out", "mountPath": "/mnt/pvc/out"},
                ],
            ),
            id="one-volume-per-claim",
        ),
        pytest.param(
            {
                "volumes": [{"name": "mine", "persistentVolumeClaim": {"claimName": "models"}}],
                "volumeMounts": [{"name": "mine", "mountPath": "/mnt/pvc/models"}],
            },
            (
                "/mnt/pvc/models/llama",
                "/mnt/pvc/models/llama-w4",
                "/mnt/pvc/data/calib.jsonl",
                [{"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}],
                [{"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True}],
            ),
            id="user-mount-wins",
        ),
    ],
)
def test_storage(overrides, expected):
    paths = storage(make_spec(**overrides))
    assert (paths.model, paths.output, paths.calibration, list(paths.volumes), list(paths.mounts)) == expected


def test_s3_model_and_output_are_left_to_the_runtime():
    paths = storage(make_spec(model="s3://bucket/llama", output="s3://bucket/out"))
    assert (paths.model, paths.output) == ("s3://bucket/llama", "s3://bucket/out")
    assert all("s3" not in str(v) for v in paths.volumes)  # nothing to mount for them


def test_s3_calibration_is_unsupported():
    # Admission refuses it; an object stored before that rule still gets a clear InvalidSpec.
    spec = make_spec(method="w4a16-gptq", calibration={"dataset": "/data/c.jsonl"})
    spec = spec.model_copy(
        update={"calibration": spec.calibration.model_copy(update={"dataset": "s3://bucket/c.jsonl"})}
    )
    with pytest.raises(
        UnsupportedLocation, match="calibration 's3://bucket/c.jsonl'.*copy the data to a PVC first"
    ):
        job(REF, spec)


@pytest.mark.parametrize(
    "overrides, tail",
    [
        pytest.param({"method": "w4a16-rtn", "calibration": None}, [], id="rtn-defaults"),
        pytest.param(
            {
                "method": "w4a16-awq",
                "groupSize": 64,
                "ignore": ["lm_head", "re:.*down_proj"],
                "calibration": {"dataset": "pvc://data/c.jsonl", "samples": 32, "seqLen": 256},
            },
            [
                "--group-size",
                "64",
                "--ignore",
                "re:.*down_proj",
                "--calibration",
                "/mnt/pvc/data/c.jsonl",
                "--samples",
                "32",
                "--seq-len",
                "256",
            ],
            id="awq-all-flags",
        ),
        pytest.param({"method": "fp8", "calibration": None, "ignore": []}, [], id="fp8"),
    ],
)
def test_quantize_command(overrides, tail):
    spec = make_spec(**overrides)
    assert quantize_command(spec, storage(spec)) == [
        "lmforge",
        "quantize",
        "--model",
        "/mnt/pvc/models/llama",
        "--method",
        spec.method,
        "--output",
        "/mnt/pvc/models/llama-w4",
        *tail,
    ]


def test_inference_service():
    assert inference_service(REF, make_spec()) is None
    assert inference_service(REF, make_spec(serveAfter={"name": "chat-w4", "replicas": 2})) == {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat-w4", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER]},
        "spec": {"model": {"source": "pvc://models/llama-w4"}, "replicas": 2},
    }


def test_inference_service_runs_where_the_job_ran():
    placement = {
        "nodeSelector": {"lmforge.dev/node-type": "process"},
        "tolerations": [
            {"key": "lmforge.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        ],
    }
    isvc = inference_service(REF, make_spec(serveAfter={"name": "chat-w4"}, **placement))
    assert isvc["spec"] == {"model": {"source": "pvc://models/llama-w4"}, "replicas": 1, **placement}


def test_inference_service_of_an_s3_output_gets_the_storage_env():
    env = [
        {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        {"name": "LMFORGE_S3_WORKERS", "value": "4"},
        {"name": "OMP_NUM_THREADS", "value": "2"},  # the quantizer's own: not copied
    ]
    isvc = inference_service(REF, make_spec(output="s3://models/w4", serveAfter={"name": "chat-w4"}, env=env))
    assert isvc["spec"] == {"model": {"source": "s3://models/w4"}, "replicas": 1, "env": env[:3]}
    local = inference_service(REF, make_spec(serveAfter={"name": "chat-w4"}, env=env))
    assert "env" not in local["spec"]  # a volume needs no credentials
