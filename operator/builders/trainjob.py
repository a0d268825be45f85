"""Pure builders of the objects a TrainJob owns: a headless Service, a ConfigMap holding
/etc/lmforge/train.json, and one worker pod per node.

No client import and no I/O: spec model in, manifest dicts out (tests compare whole objects).
Names are deterministic (`<job>`, `<job>-config`, `<job>-<rank>`), so creating twice is an
AlreadyExists, never a duplicate: an operator killed at any moment cannot leave two gangs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lmforge.operator.api.constants import (
    ANNOTATION_KUEUE_POD_GROUP_COUNT,
    ANNOTATION_SPEC_HASH,
    CONFIG_FILE,
    CONFIG_MOUNT_PATH,
    LABEL_JOB_NAME,
    LABEL_KIND,
    LABEL_KUEUE_POD_GROUP,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_RANK,
    LABEL_RESTART,
    MANAGED_BY,
    MASTER_PORT,
)
from lmforge.operator.api.trainjob import Checkpoint, LoRA, TrainConfig, TrainJobSpec
from lmforge.operator.builders.owner import OwnerRef
from lmforge.operator.builders.owner import owner_reference as owned_by
from lmforge.operator.builders.storage import PVC_ROOT, locate

CONTAINER_NAME = "trainer"
CONFIG_VOLUME = "lmforge-config"
DEFAULT_IMAGE = "ghcr.io/lmforge/runtime:0.1.0"


JobRef = OwnerRef  # the TrainJob the objects belong to
# Spec fields the operator reads live on every reconcile; every other field is baked into the gang
# (pods + train.json) when it starts, so it may change only while the job is suspended (CEL).
LIVE_FIELDS = frozenset({"suspend", "failurePolicy", "activeDeadlineSeconds", "ttlSecondsAfterFinished"})


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """Operator-wide settings the builders need (see `from_env` in the controller)."""

    default_image: str = DEFAULT_IMAGE
    master_port: int = MASTER_PORT
    termination_grace_seconds: int = 30  # time for the worker to checkpoint on SIGTERM
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None  # lets rank 0 annotate its own pod with progress


def pod_name(job_name: str, rank: int) -> str:
    return f"{job_name}-{rank}"


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def master_addr(job_name: str) -> str:
    """Rank 0's stable DNS name through the headless Service: <job>-0.<job>."""
    return f"{pod_name(job_name, 0)}.{job_name}"


def owner_reference(job: JobRef) -> dict[str, Any]:
    return owned_by(job, "TrainJob")


def selector_labels(job_name: str) -> dict[str, str]:
    return {LABEL_JOB_NAME: job_name}


def _common_labels(job_name: str) -> dict[str, str]:
    return {**selector_labels(job_name), LABEL_KIND: "TrainJob", LABEL_MANAGED_BY: MANAGED_BY}


def _metadata(job: JobRef, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }


def headless_service(job: JobRef, cfg: BuildConfig = BuildConfig()) -> dict[str, Any]:
    """Gives each worker the DNS name <job>-<rank>.<job>; published before readiness so that
    ranks can rendezvous while they start."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.name, _common_labels(job.name)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(job.name),
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "master", "port": cfg.master_port, "targetPort": cfg.master_port, "protocol": "TCP"}
            ],
        },
    }


def train_config(job: JobRef, spec: TrainJobSpec) -> TrainConfig:
    """The worker's view of the job: every default resolved, nothing Kubernetes-specific."""
    checkpoint = spec.checkpoint
    if checkpoint.dir is None:
        checkpoint = Checkpoint(
            **{**checkpoint.model_dump(), "dir": f"{spec.output.dir.rstrip('/')}/checkpoints"}
        )
    return TrainConfig(
        job_name=job.name,
        model=spec.model,
        dataset=spec.dataset,
        method=spec.method,
        lora=(spec.lora or LoRA()) if spec.method == "lora" else None,
        backend=spec.backend,
        zero_stage=(spec.zero_stage or 2) if spec.backend == "deepspeed" else None,
        num_nodes=spec.num_nodes,
        procs_per_node=spec.effective_procs_per_node(),
        hyperparameters=spec.hyperparameters,
        checkpoint=checkpoint,
        output=spec.output,
    )


def config_map(job: JobRef, spec: TrainJobSpec) -> dict[str, Any]:
    body = json.dumps(train_config(job, spec).to_k8s(), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), _common_labels(job.name)),
        "data": {CONFIG_FILE: body},
    }


def gang_spec_hash(spec: TrainJobSpec) -> str:
    """16 hex digits over the spec fields a gang is built from (not LIVE_FIELDS): stamped on every
    worker pod, so a gang built from an older spec is recognised however the change got in (an
    edit while suspended that the operator, down at the time, never saw suspended)."""
    baked = {k: v for k, v in spec.to_k8s().items() if k not in LIVE_FIELDS}
    return hashlib.sha256(json.dumps(baked, sort_keys=True).encode()).hexdigest()[:16]


def launcher_command(
    job_name: str, spec: TrainJobSpec, rank: int, cfg: BuildConfig = BuildConfig()
) -> list[str]:
    """`lmforge.runtime.train.launch`: torchrun with a static rendezvous on rank 0, its shape taken
    from the PET_* env (worker_env), for both backends (DeepSpeed initialises from the same env, no
    ssh launcher). Plain torchrun exits 1 on SIGTERM, which would read as an application error; the
    launcher exits 143 after the workers checkpoint, and 128+N when a worker dies of signal N, so
    the failure policy can classify it. torchrun never restarts workers itself (PET_MAX_RESTARTS
    0): the operator restarts the whole gang. `spec.command` (bring your own script) wins."""
    if spec.command:
        return list(spec.command)
    return [
        "python",
        "-P",
        "-m",
        "lmforge.runtime.train.launch",
        "--config",
        f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE}",
    ]


def worker_env(
    job_name: str, spec: TrainJobSpec, rank: int, attempt: int, cfg: BuildConfig = BuildConfig()
) -> list[dict[str, Any]]:
    """The env contract (DESIGN.md). WORLD_SIZE is the total process count (torch's meaning),
    NODE_RANK the pod's rank. User `env` entries replace ours of the same name."""
    nproc = spec.effective_procs_per_node()
    addr = master_addr(job_name)
    ours: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(spec.num_nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "value": str(rank)},
        {"name": "PET_MASTER_ADDR", "value": addr},
        {"name": "PET_MASTER_PORT", "value": str(cfg.master_port)},
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "MASTER_ADDR", "value": addr},
        {"name": "MASTER_PORT", "value": str(cfg.master_port)},
        {"name": "WORLD_SIZE", "value": str(spec.num_nodes * nproc)},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "LMFORGE_JOB_NAME", "value": job_name},
        {"name": "LMFORGE_RESTART_ATTEMPT", "value": str(attempt)},
        {"name": "LMFORGE_CONFIG", "value": f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE}"},
        {"name": "LMFORGE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    user = [e.to_k8s() for e in spec.env or ()]
    overridden = {e["name"] for e in user}
    return [e for e in ours if e["name"] not in overridden] + user


def storage_volumes(spec: TrainJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the job's own locations, so a spec needs no `volumes` boilerplate:
    each pvc://<claim> is mounted at /mnt/pvc/<claim>, each hostPath:///<dir> at the same path.
    Locations the user already mounts (same mountPath) are left to the user's volumes."""
    user_paths = {m.get("mountPath") for m in spec.volume_mounts or ()}
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    writable = [spec.output.dir, *([spec.checkpoint.dir] if spec.checkpoint.dir else [])]
    for uri in (spec.model, spec.dataset.source, *writable):
        location = locate(uri)
        if location is not None and location.kind == "pvc":
            path, volume = (
                location.mount_path,
                {"name": location.pvc_volume_name, "persistentVolumeClaim": {"claimName": location.claim}},
            )
        elif location is not None and location.kind == "hostPath":
            path = location.path
            kind = "DirectoryOrCreate" if uri in writable else ""
            volume = {
                "name": f"host-{len(volumes)}",
                "hostPath": {"path": path, **({"type": kind} if kind else {})},
            }
        else:
            continue  # plain paths come from the image or user volumes; hf:// is downloaded by the worker (runtime/hub.py)
        if path in user_paths or any(m["mountPath"] == path for m in mounts):
            continue
        volumes.append(volume)
        mounts.append({"name": volume["name"], "mountPath": path})
    return volumes, mounts


def pod_labels(job_name: str, spec: TrainJobSpec, rank: int, attempt: int) -> dict[str, str]:
    labels = {**_common_labels(job_name), LABEL_RANK: str(rank), LABEL_RESTART: str(attempt)}
    if spec.queue_name:
        labels[LABEL_KUEUE_QUEUE] = spec.queue_name
        labels[LABEL_KUEUE_POD_GROUP] = f"{job_name}-{attempt}"  # Kueue admits the gang all-or-nothing
    return labels


def worker_pod(
    job: JobRef, spec: TrainJobSpec, rank: int, attempt: int, cfg: BuildConfig = BuildConfig()
) -> dict[str, Any]:
    """Worker `rank` of gang `attempt`. restartPolicy Never: a failed worker is the operator's
    decision (restart the whole gang or fail the job), never the kubelet's."""
    name = pod_name(job.name, rank)
    metadata = _metadata(job, name, pod_labels(job.name, spec, rank, attempt))
    storage, storage_mounts = storage_volumes(spec)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: gang_spec_hash(spec)}
    if spec.queue_name:
        metadata["annotations"][ANNOTATION_KUEUE_POD_GROUP_COUNT] = str(spec.num_nodes)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or cfg.default_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": launcher_command(job.name, spec, rank, cfg),
        "env": worker_env(job.name, spec, rank, attempt, cfg),
        "ports": [{"name": "master", "containerPort": cfg.master_port, "protocol": "TCP"}],
        # the worker writes its error (e.g. a download naming the URI) to /dev/termination-log;
        # without one, the log tail: TrainJob.status.lastFailure.message either way
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
            *storage_mounts,
            *(spec.volume_mounts or ()),
        ],
    }
    if spec.resources_per_node:  # quantities as strings, the form the API (and its clients) expect
        container["resources"] = {
            section: {k: str(v) for k, v in table.items()}
            for section, table in spec.resources_per_node.to_k8s().items()
        }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": job.name,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": cfg.termination_grace_seconds,
        "containers": [container],
        "volumes": [
            {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(job.name)}},
            *storage,
            *(spec.volumes or ()),
        ],
    }
    optional = {
        "serviceAccountName": cfg.service_account,
        "schedulerName": spec.scheduler_name,
        "priorityClassName": spec.priority_class_name,
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def gang(
    job: JobRef,
    spec: TrainJobSpec,
    attempt: int,
    ranks: list[int] | None = None,
    cfg: BuildConfig = BuildConfig(),
) -> list[dict[str, Any]]:
    """Worker pods of `attempt` for `ranks` (default: all)."""
    return [
        worker_pod(job, spec, rank, attempt, cfg)
        for rank in (range(spec.num_nodes) if ranks is None else ranks)
    ]
