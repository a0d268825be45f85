"""Builders of a TrainJob's Service, ConfigMap and worker pods: whole-object equality."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from lmforge.devcluster.factories import JOB, make_spec
from lmforge.operator.builders.trainjob import (
    LIVE_FIELDS,
    BuildConfig,
    config_map,
    gang,
    gang_spec_hash,
    headless_service,
    storage_volumes,
    train_config,
    worker_env,
    worker_pod,
)

OWNER = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "TrainJob",
    "name": "llama",
    "uid": "0000-1111",
    "controller": True,
    "blockOwnerDeletion": True,
}
COMMON_LABELS = {
    "lmforge.dev/job-name": "llama",
    "lmforge.dev/kind": "TrainJob",
    "app.kubernetes.io/managed-by": "lmforge-operator",
}
TORCHRUN_RANK1 = ["python", "-P", "-m", "lmforge.runtime.train.launch", "--config", "/etc/lmforge/train.json"]


def expected_env(rank: int = 1, attempt: int = 0, nnodes: int = 4, nproc: int = 8) -> list[dict[str, Any]]:
    return [
        {"name": "PET_NNODES", "value": str(nnodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "value": str(rank)},
        {"name": "PET_MASTER_ADDR", "value": "llama-0.llama"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "MASTER_ADDR", "value": "llama-0.llama"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "WORLD_SIZE", "value": str(nnodes * nproc)},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "LMFORGE_JOB_NAME", "value": "llama"},
        {"name": "LMFORGE_RESTART_ATTEMPT", "value": str(attempt)},
        {"name": "LMFORGE_CONFIG", "value": "/etc/lmforge/train.json"},
        {"name": "LMFORGE_PVC_ROOT", "value": "/mnt/pvc"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]


def expected_pod(rank: int = 1, attempt: int = 0) -> dict[str, Any]:
    """Worker `rank` of the base spec: 4 nodes x 8 GPUs, torchrun, default image."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"llama-{rank}",
            "namespace": "team-a",
            "labels": {**COMMON_LABELS, "lmforge.dev/rank": str(rank), "lmforge.dev/restart": str(attempt)},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "restartPolicy": "Never",
            "hostname": f"llama-{rank}",
            "subdomain": "llama",
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "trainer",
                    "image": "ghcr.io/lmforge/runtime:0.1.0",
                    "imagePullPolicy": "IfNotPresent",
                    "command": TORCHRUN_RANK1,
                    "env": expected_env(rank, attempt),
                    "ports": [{"name": "master", "containerPort": 29500, "protocol": "TCP"}],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [
                        {"name": "lmforge-config", "mountPath": "/etc/lmforge", "readOnly": True},
                        {"name": "pvc-models", "mountPath": "/mnt/pvc/models"},
                        {"name": "pvc-data", "mountPath": "/mnt/pvc/data"},
                        {"name": "pvc-out", "mountPath": "/mnt/pvc/out"},
                    ],
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
            "volumes": [
                {"name": "lmforge-config", "configMap": {"name": "llama-config"}},
                {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
                {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "pvc-out", "persistentVolumeClaim": {"claimName": "out"}},
            ],
        },
    }


BASE = {"numNodes": 4, "resourcesPerNode": {"limits": {"nvidia.com/gpu": 8}}}


def _with(pod: dict[str, Any], edit) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    edit(pod)
    return pod


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


POD_CASES = [
    pytest.param({}, expected_pod(), id="torchrun-default"),
    pytest.param(
        {"backend": "deepspeed", "zeroStage": 3},
        expected_pod(),  # same launcher: the backend only changes train.json (DeepSpeed under torchrun)
        id="deepspeed",
    ),
    pytest.param(
        {"command": ["python", "/scripts/my_train.py"], "image": "me/trainer:1"},
        _with(
            expected_pod(),
            lambda p: _container(p).update(command=["python", "/scripts/my_train.py"], image="me/trainer:1"),
        ),
        id="bring-your-own-command",
    ),
    pytest.param(
        {"queueName": "gpu-queue"},
        _with(
            expected_pod(),
            lambda p: (
                p["metadata"]["labels"].update(
                    {"kueue.x-k8s.io/queue-name": "gpu-queue", "kueue.x-k8s.io/pod-group-name": "llama-0"}
                ),
                p["metadata"]
                .setdefault("annotations", {})
                .update({"kueue.x-k8s.io/pod-group-total-count": "4"}),
            ),
        ),
        id="kueue-queue",
    ),
    pytest.param(
        {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MASTER_PORT", "value": "1234"}]},
        _with(
            expected_pod(),
            lambda p: _container(p).update(
                env=[e for e in expected_env() if e["name"] != "MASTER_PORT"]
                + [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MASTER_PORT", "value": "1234"}]
            ),
        ),
        id="user-env-overrides",
    ),
    pytest.param(
        {
            "schedulerName": "volcano",
            "priorityClassName": "high",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
            "volumeMounts": [{"name": "models", "mountPath": "/models"}],
        },
        _with(
            expected_pod(),
            lambda p: (
                p["spec"].update(
                    schedulerName="volcano",
                    priorityClassName="high",
                    nodeSelector={"gpu": "h100"},
                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                ),
                p["spec"]["volumes"].append(
                    {"name": "models", "persistentVolumeClaim": {"claimName": "models"}}
                ),
                _container(p)["volumeMounts"].append({"name": "models", "mountPath": "/models"}),
            ),
        ),
        id="scheduling-and-volumes",
    ),
]


@pytest.mark.parametrize(("overrides", "want"), POD_CASES)
def test_worker_pod(overrides: dict[str, Any], want: dict[str, Any]) -> None:
    spec = make_spec(**{**BASE, **overrides})
    want = _with(
        want,
        lambda p: (
            p["metadata"]
            .setdefault("annotations", {})
            .update({"lmforge.dev/spec-hash": gang_spec_hash(spec)})
        ),
    )
    assert worker_pod(JOB, spec, rank=1, attempt=0) == want


def test_restart_attempt_is_labelled_and_in_env() -> None:
    got = worker_pod(JOB, make_spec(**BASE), rank=1, attempt=3)
    want = expected_pod(rank=1, attempt=3) | {
        "spec": {
            **expected_pod()["spec"],
            "containers": [{**_container(expected_pod()), "env": expected_env(attempt=3)}],
        }
    }
    want["metadata"]["annotations"] = {"lmforge.dev/spec-hash": gang_spec_hash(make_spec(**BASE))}
    assert got == want


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suspend", True),
        ("failurePolicy", {"maxRestarts": 9}),
        ("activeDeadlineSeconds", 60),
        ("ttlSecondsAfterFinished", 5),
    ],
    ids=lambda v: str(v),
)
def test_spec_hash_ignores_the_fields_read_live(field: str, value: Any) -> None:
    assert field in LIVE_FIELDS
    assert gang_spec_hash(make_spec(**{**BASE, field: value})) == gang_spec_hash(make_spec(**BASE))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "/models/other"),
        ("hyperparameters", {"learningRate": 0.5}),
        ("numNodes", 2),
        ("image", "me/trainer:2"),
        ("env", [{"name": "X", "value": "1"}]),
    ],
    ids=lambda v: str(v),
)
def test_spec_hash_changes_with_what_the_gang_is_built_from(field: str, value: Any) -> None:
    assert gang_spec_hash(make_spec(**{**BASE, field: value})) != gang_spec_hash(make_spec(**BASE))
    assert len(gang_spec_hash(make_spec(**BASE))) == 16


def test_procs_per_node_defaults_to_one_without_gpus() -> None:
    pod = worker_pod(JOB, make_spec(numNodes=2), rank=0, attempt=0)
    env = {e["name"]: e.get("value") for e in _container(pod)["env"]}
    assert env["PET_NPROC_PER_NODE"] == "1"
    assert "resources" not in _container(pod)
    assert {"name": "WORLD_SIZE", "value": "2"} in _container(pod)["env"]


def test_gang_is_one_pod_per_rank_with_stable_hostnames() -> None:
    pods = gang(JOB, make_spec(**BASE), attempt=0)
    assert [
        (p["metadata"]["name"], p["spec"]["hostname"], p["metadata"]["labels"]["lmforge.dev/rank"])
        for p in pods
    ] == [
        ("llama-0", "llama-0", "0"),
        ("llama-1", "llama-1", "1"),
        ("llama-2", "llama-2", "2"),
        ("llama-3", "llama-3", "3"),
    ]
    assert [p["metadata"]["name"] for p in gang(JOB, make_spec(**BASE), attempt=1, ranks=[2])] == ["llama-2"]


def test_headless_service() -> None:
    assert headless_service(JOB) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "llama",
            "namespace": "team-a",
            "labels": COMMON_LABELS,
            "ownerReferences": [OWNER],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {"lmforge.dev/job-name": "llama"},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "master", "port": 29500, "targetPort": 29500, "protocol": "TCP"}],
        },
    }


def test_config_map_holds_the_resolved_train_config() -> None:
    spec = make_spec(numNodes=2, procsPerNode=4, backend="deepspeed", hyperparameters={"maxSteps": 100})
    cm = config_map(JOB, spec)
    assert cm["metadata"] == {
        "name": "llama-config",
        "namespace": "team-a",
        "labels": COMMON_LABELS,
        "ownerReferences": [OWNER],
    }
    assert json.loads(cm["data"]["train.json"]) == {
        "jobName": "llama",
        "model": "pvc://models/llama-3.2-1b",
        "dataset": {"source": "pvc://data/chat.jsonl", "format": "messages"},
        "method": "lora",
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.05,
            "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "backend": "deepspeed",
        "zeroStage": 2,
        "numNodes": 2,
        "procsPerNode": 4,
        "hyperparameters": {
            "learningRate": 0.0001,
            "maxSteps": 100,
            "batchSize": 1,
            "seqLen": 2048,
            "gradientAccumulationSteps": 1,
            "warmupSteps": 0,
            "weightDecay": 0.0,
            "lrScheduler": "cosine",
            "maxGradNorm": 1.0,
            "precision": "bf16",
            "gradientCheckpointing": False,
            "seed": 42,
            "logEverySteps": 10,
        },
        "checkpoint": {
            "dir": "pvc://out/llama-lora/checkpoints",
            "everySteps": 500,
            "keepLast": 3,
            "resume": "auto",
        },
        "output": {"dir": "pvc://out/llama-lora", "mergeAdapter": False},
    }


@pytest.mark.parametrize(
    ("overrides", "lora", "zero_stage", "checkpoint_dir"),
    [
        pytest.param(
            {"method": "full"}, None, None, "pvc://out/llama-lora/checkpoints", id="full-has-no-lora"
        ),
        pytest.param({"lora": {"r": 8}}, 8, None, "pvc://out/llama-lora/checkpoints", id="lora-r"),
        pytest.param({"checkpoint": {"dir": "/ckpt"}}, 16, None, "/ckpt", id="explicit-checkpoint-dir"),
        pytest.param(
            {"backend": "deepspeed", "zeroStage": 1}, 16, 1, "pvc://out/llama-lora/checkpoints", id="zero1"
        ),
    ],
)
def test_train_config_resolves_defaults(overrides, lora, zero_stage, checkpoint_dir) -> None:
    config = train_config(JOB, make_spec(**overrides))
    assert (config.lora.r if config.lora else None, config.zero_stage, config.checkpoint.dir) == (
        lora,
        zero_stage,
        checkpoint_dir,
    )


def test_storage_volumes_for_hostpath_and_user_mounted_claims() -> None:
    spec = make_spec(
        model="hostPath:///models/llama",
        dataset={"source": "pvc://data/chat.jsonl"},
        output={"dir": "hostPath:///out/run1/"},
        checkpoint={"dir": "pvc://data/ckpt"},
        volumeMounts=[{"name": "mine", "mountPath": "/mnt/pvc/data"}],
    )
    assert storage_volumes(spec) == (
        [
            {"name": "host-0", "hostPath": {"path": "/models/llama"}},
            {"name": "host-1", "hostPath": {"path": "/out/run1", "type": "DirectoryOrCreate"}},
        ],
        [{"name": "host-0", "mountPath": "/models/llama"}, {"name": "host-1", "mountPath": "/out/run1"}],
    )


def test_service_account_from_build_config() -> None:
    pod = worker_pod(JOB, make_spec(), rank=0, attempt=0, cfg=BuildConfig(service_account="lmforge-worker"))
    assert pod["spec"]["serviceAccountName"] == "lmforge-worker"


def test_master_port_comes_from_build_config() -> None:
    env = {
        e["name"]: e.get("value")
        for e in worker_env("llama", make_spec(), rank=0, attempt=0, cfg=BuildConfig(master_port=23456))
    }
    assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == "23456"
