"""Builders of an InferenceService's Deployment, Service and PodDisruptionBudget: whole objects."""

from __future__ import annotations

from typing import Any

import pytest

from lmforge.operator.api.inferenceservice import InferenceServiceSpec
from lmforge.operator.builders.inferenceservice import (
    BuildConfig,
    ModelLocation,
    ServiceRef,
    deployment,
    model_location,
    pod_disruption_budget,
    pod_template,
    replicas_to_apply,
    selector,
    service,
    url,
)
from lmforge.operator.builders.storage import ModelCache

REF = ServiceRef(name="chat", namespace="team-a", uid="uid-1")
OWNER = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "InferenceService",
    "name": "chat",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "lmforge.dev/inferenceservice": "chat",
    "lmforge.dev/kind": "InferenceService",
    "app.kubernetes.io/managed-by": "lmforge-operator",
}
METADATA = {"name": "chat", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER]}


def make_spec(**overrides: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {"model": {"source": "pvc://models/llama/merged"}, **overrides}
    )


BASE_COMMAND = [
    "lmforge",
    "serve",
    "--model",
    "/mnt/pvc/models/llama/merged",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--served-model-name",
    "chat",
    "--dtype",
    "auto",
    "--gpu-memory-utilization",
    "0.9",
    "--max-num-seqs",
    "256",
    "--max-num-batched-tokens",
    "8192",
    "--block-size",
    "16",
    "--enable-prefix-caching",
    "--graceful-shutdown-seconds",
    "60",
]
BASE_ENV = [
    {"name": "LMFORGE_INFERENCESERVICE", "value": "chat"},
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
]


def expected_deployment(replicas: int = 1) -> dict[str, Any]:
    """The base spec: pvc:// model, default engine, no resources."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": METADATA,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"lmforge.dev/inferenceservice": "chat"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": 2100,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": LABELS,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": "8000",
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 80,  # preStop 5 + drain 60 + engine stop 15
                    "containers": [
                        {
                            "name": "server",
                            "image": "ghcr.io/lmforge/runtime:0.1.0",
                            "imagePullPolicy": "IfNotPresent",
                            "command": BASE_COMMAND,
                            "env": BASE_ENV,
                            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                            "startupProbe": {
                                "httpGet": {"path": "/health", "port": "http"},
                                "periodSeconds": 10,
                                "timeoutSeconds": 5,
                                "failureThreshold": 180,
                            },
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": "http"},
                                "periodSeconds": 5,
                                "timeoutSeconds": 3,
                                "successThreshold": 1,
                                "failureThreshold": 2,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/version", "port": "http"},
                                "periodSeconds": 15,
                                "timeoutSeconds": 5,
                                "failureThreshold": 4,
                            },
                            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                            "volumeMounts": [
                                {"name": "model", "mountPath": "/mnt/pvc/models", "readOnly": True}
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
                    ],
                },
            },
        },
    }


def test_deployment_of_the_base_spec() -> None:
    assert deployment(REF, make_spec(), 1) == expected_deployment()


def test_deployment_with_everything_set() -> None:
    spec = make_spec(
        model={
            "source": "hostPath:///data/llama",
            "servedName": "llama",
            "dtype": "bfloat16",
            "maxModelLen": 4096,
            "quantization": "w4a16",
        },
        engine={
            "gpuMemoryUtilization": 0.85,
            "maxNumSeqs": 64,
            "maxNumBatchedTokens": 4096,
            "blockSize": 32,
            "prefixCaching": False,
            "kvCacheDtype": "int8",
            "enforceEager": True,
        },
        resources={"limits": {"nvidia.com/gpu": 1}},
        apiKeySecret={"name": "chat-key"},
        image="registry.local/runtime:dev",
        nodeSelector={"gpu": "h100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        env=[{"name": "POD_NAME", "value": "fixed"}, {"name": "HF_TOKEN", "value": "t"}],
        volumes=[{"name": "shm", "emptyDir": {"medium": "Memory"}}],
        volumeMounts=[{"name": "shm", "mountPath": "/dev/shm"}],
        startupTimeoutSeconds=600,
        gracefulShutdownSeconds=120,
    )
    want = expected_deployment(3)
    want["spec"]["progressDeadlineSeconds"] = 900
    pod = want["spec"]["template"]["spec"]
    pod.update(
        {
            "terminationGracePeriodSeconds": 140,
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "volumes": [
                {"name": "model", "hostPath": {"path": "/data/llama", "type": "Directory"}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        }
    )
    container = pod["containers"][0]
    container.update(
        {
            "image": "registry.local/runtime:dev",
            "command": [
                "lmforge",
                "serve",
                "--model",
                "/data/llama",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
                "--served-model-name",
                "llama",
                "--dtype",
                "bfloat16",
                "--max-model-len",
                "4096",
                "--gpu-memory-utilization",
                "0.85",
                "--max-num-seqs",
                "64",
                "--max-num-batched-tokens",
                "4096",
                "--block-size",
                "32",
                "--no-enable-prefix-caching",
                "--graceful-shutdown-seconds",
                "120",
                "--quantization",
                "w4a16",
                "--kv-cache-dtype",
                "int8",
                "--enforce-eager",
            ],
            "env": [
                BASE_ENV[0],
                BASE_ENV[2],
                {
                    "name": "LMFORGE_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "chat-key", "key": "api-key"}},
                },
                {"name": "POD_NAME", "value": "fixed"},
                {"name": "HF_TOKEN", "value": "t"},
            ],
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "volumeMounts": [
                {"name": "model", "mountPath": "/data/llama", "readOnly": True},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
            "startupProbe": {**container["startupProbe"], "failureThreshold": 60},
        }
    )
    assert deployment(REF, spec, 3) == want


@pytest.mark.parametrize(
    ("source", "want"),
    [
        pytest.param(
            "pvc://models",
            ModelLocation(
                path="/mnt/pvc/models",
                volumes=(
                    {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                ),
                mounts=({"name": "model", "mountPath": "/mnt/pvc/models", "readOnly": True},),
            ),
            id="pvc-root",
        ),
        pytest.param(
            "pvc://models/a/b/",
            ModelLocation(
                path="/mnt/pvc/models/a/b",
                volumes=(
                    {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                ),
                mounts=({"name": "model", "mountPath": "/mnt/pvc/models", "readOnly": True},),
            ),
            id="pvc-path",
        ),
        pytest.param(
            "/srv/llama/",
            ModelLocation(
                path="/srv/llama",
                volumes=({"name": "model", "hostPath": {"path": "/srv/llama", "type": "Directory"}},),
                mounts=({"name": "model", "mountPath": "/srv/llama", "readOnly": True},),
            ),
            id="absolute-path",
        ),
        pytest.param(
            "hf://meta-llama/Llama-3.2-1B",
            ModelLocation(
                path="/mnt/model",
                fetch_from="hf://meta-llama/Llama-3.2-1B",
                volumes=({"name": "model", "emptyDir": {}},),
                mounts=({"name": "model", "mountPath": "/mnt/model", "readOnly": True},),
                notes=(
                    "model hf://meta-llama/Llama-3.2-1B is downloaded by the storage initializer into every "
                    "replica, at start: the pods need network access to it (and credentials in spec.env for "
                    "private data); a pvc:// copy needs none",
                ),
            ),
            id="hugging-face",
        ),
    ],
)
def test_model_location(source: str, want: ModelLocation) -> None:
    assert model_location(make_spec(model={"source": source})) == want


def test_a_user_mount_at_the_model_path_wins() -> None:
    spec = make_spec(
        model={"source": "pvc://models/x"},
        volumes=[{"name": "mine", "csi": {"driver": "d"}}],
        volumeMounts=[{"name": "mine", "mountPath": "/mnt/pvc/models"}],
    )
    assert model_location(spec) == ModelLocation(path="/mnt/pvc/models/x")


AWS_ENV = [
    {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"},
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
]


@pytest.mark.parametrize(
    ("cache", "want_init_mounts", "want_server_mounts", "want_volumes", "cache_flags"),
    [
        pytest.param(
            None,
            [{"name": "model", "mountPath": "/mnt/model"}],
            [{"name": "model", "mountPath": "/mnt/model", "readOnly": True}],
            [{"name": "model", "emptyDir": {}}],
            [],
            id="no-cache",
        ),
        pytest.param(
            ModelCache("/var/lib/lmforge/model-cache", "200Gi"),
            [
                {"name": "model", "mountPath": "/mnt/model"},
                {"name": "model-cache", "mountPath": "/var/lib/lmforge/model-cache"},
            ],
            [
                {"name": "model", "mountPath": "/mnt/model", "readOnly": True},
                {"name": "model-cache", "mountPath": "/var/lib/lmforge/model-cache"},
            ],
            [
                {"name": "model", "emptyDir": {}},
                {
                    "name": "model-cache",
                    "hostPath": {"path": "/var/lib/lmforge/model-cache", "type": "DirectoryOrCreate"},
                },
            ],
            ["--cache-dir", "/var/lib/lmforge/model-cache", "--cache-max-bytes", "200Gi"],
            id="node-cache",
        ),
    ],
)
def test_remote_model_is_fetched_by_the_storage_initializer(
    cache: ModelCache | None,
    want_init_mounts: list[dict[str, Any]],
    want_server_mounts: list[dict[str, Any]],
    want_volumes: list[dict[str, Any]],
    cache_flags: list[str],
) -> None:
    spec = make_spec(model={"source": "s3://models/llama/v1"}, env=AWS_ENV)
    pod = pod_template(REF, spec, BuildConfig(model_cache=cache))["spec"]
    assert pod["initContainers"] == [
        {
            "name": "storage-initializer",
            "image": "ghcr.io/lmforge/runtime:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "command": ["lmforge", "fetch", "s3://models/llama/v1", "/mnt/model", *cache_flags],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                *AWS_ENV,
            ],
            "volumeMounts": want_init_mounts,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
    ]
    server = pod["containers"][0]
    assert server["command"][2:4] == ["--model", "/mnt/model"]
    assert server["volumeMounts"] == want_server_mounts
    assert pod["volumes"] == want_volumes
    assert [e for e in server["env"] if e["name"].startswith("AWS_")] == AWS_ENV  # the server gets them too


def test_local_models_need_no_initializer() -> None:
    assert "initContainers" not in pod_template(REF, make_spec(model={"source": "pvc://m/x"}))["spec"]


def test_service() -> None:
    assert service(REF) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": METADATA,
        "spec": {
            "type": "ClusterIP",
            "selector": {"lmforge.dev/inferenceservice": "chat"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


PDB = {
    "apiVersion": "policy/v1",
    "kind": "PodDisruptionBudget",
    "metadata": METADATA,
    "spec": {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"lmforge.dev/inferenceservice": "chat"}},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    },
}


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        pytest.param({}, None, id="one-replica-none"),
        pytest.param({"replicas": 2}, PDB, id="two-replicas"),
        pytest.param(
            {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
            PDB,
            id="autoscaling-up-to-3",
        ),
        pytest.param({"replicas": 3, "autoscaling": {"maxReplicas": 1}}, None, id="autoscaling-max-1"),
    ],
)
def test_pod_disruption_budget(overrides: dict, want: dict | None) -> None:
    assert pod_disruption_budget(REF, make_spec(**overrides)) == want


@pytest.mark.parametrize(
    ("overrides", "current", "changed", "want"),
    [
        pytest.param({"replicas": 3}, 5, False, 3, id="manual-follows-spec"),
        pytest.param({"replicas": 0}, None, True, 0, id="manual-zero"),
        pytest.param(
            {"replicas": 1, "autoscaling": {"minReplicas": 2, "maxReplicas": 6}},
            None,
            True,
            2,
            id="autoscaling-new-deployment-clamped",
        ),
        pytest.param(
            {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 6}},
            5,
            False,
            5,
            id="autoscaling-keeps-its-size",
        ),
        pytest.param(
            {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            5,
            False,
            4,
            id="autoscaling-new-max-clamps",
        ),
        pytest.param(
            {"replicas": 3, "autoscaling": {"minReplicas": 0, "maxReplicas": 4}},
            0,
            True,
            3,
            id="autoscaling-kubectl-scale-wakes-from-zero",
        ),
    ],
)
def test_replicas_to_apply(overrides: dict, current: int | None, changed: bool, want: int) -> None:
    assert replicas_to_apply(make_spec(**overrides), current, changed) == want


def test_names() -> None:
    assert selector("chat") == "lmforge.dev/inferenceservice=chat"
    assert url("chat", "team-a") == "http://chat.team-a.svc.cluster.local/v1"
    assert (
        url("chat", "team-a", BuildConfig(cluster_domain="k8s.internal"))
        == "http://chat.team-a.svc.k8s.internal/v1"
    )
