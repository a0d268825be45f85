"""Pure builders of the objects an InferenceService owns: a Deployment of `lmforge serve` pods, a
Service (port 80 -> 8000, named http) and, when more than one replica can exist, a
PodDisruptionBudget.

No client import and no I/O: spec model in, manifest dicts out (tests compare whole objects).
Every object is named after the InferenceService, so applying twice updates, never duplicates.

Pod lifecycle, and why each knob has its value:
- startupProbe on /health (503 while the model loads) with a budget of `startupTimeoutSeconds`
  (default 30 min): a 70B checkpoint from a network volume is not a crash.
- readinessProbe on /health: a pod receives traffic only once loaded, and drops out of the
  Service endpoints as soon as it starts draining (/health turns 503 on SIGTERM).
- livenessProbe on /version: answered by the event loop, not the engine, so a long generate never
  fails it, and a draining pod (whose /health is 503) is not killed early.
- preStop sleeps a few seconds (the kubelet's own `sleep` action, Kubernetes >= 1.30: no shell
  needed in the image) so endpoint controllers and proxies drop the pod before the server sees
  SIGTERM; terminationGracePeriodSeconds covers that sleep + the server's drain
  (--graceful-shutdown-seconds) + the engine's own shutdown.
- Rolling updates add a pod before removing one (maxSurge 1, maxUnavailable 0), and the
  Deployment's progress deadline is longer than the startup budget, so a slow load is not
  reported as a stuck rollout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmforge.operator.api.constants import LABEL_KIND, LABEL_MANAGED_BY, MANAGED_BY
from lmforge.operator.api.inferenceservice import InferenceServiceSpec
from lmforge.operator.builders.inferenceservice_adapters import root_volumes as adapter_root_volumes
from lmforge.operator.builders.owner import OwnerRef
from lmforge.operator.builders.owner import owner_reference as owned_by
from lmforge.operator.builders.storage import ModelCache, locate, storage_initializer

KIND = "InferenceService"
LABEL_INFERENCESERVICE = "lmforge.dev/inferenceservice"
# URL template of a pod's /metrics; {pod}, {ip}, {namespace} and {name} are filled in.
ANNOTATION_METRICS_URL = "lmforge.dev/metrics-url"
CONTAINER_NAME = "server"
SERVER_PORT = 8000
SERVICE_PORT = 80
PORT_NAME = "http"
MODEL_VOLUME = "model"
MODEL_DIR = "/mnt/model"  # where the storage initializer puts a remote model (an emptyDir)
DEFAULT_IMAGE = "ghcr.io/lmforge/runtime:0.1.0"
ENGINE_SHUTDOWN_MARGIN_SECONDS = 15  # engine abort (10 s) + uvicorn stop after the drain


ServiceRef = OwnerRef  # the InferenceService the objects belong to


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """Operator-wide settings (see `build_config_from_env` in the controller)."""

    default_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cluster_domain: str = "cluster.local"
    pre_stop_sleep_seconds: int = 5
    startup_period_seconds: int = 10
    readiness_period_seconds: int = 5
    liveness_period_seconds: int = 15
    liveness_failure_threshold: int = 4  # a minute of no answer from the event loop
    revision_history_limit: int = 3
    model_cache: ModelCache | None = None  # the node model cache (Helm values modelCache), opt-in
    # NCCL_* variables of the operator's own environment (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE set
    # in the chart's values), passed to every tensor-parallel server; spec.env overrides them
    nccl_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where the server finds the checkpoint, and what the pod needs for that."""

    path: str  # the --model argument
    fetch_from: str | None = None  # a remote source the storage initializer downloads into `path`
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    env: tuple[dict[str, Any], ...] = ()
    notes: tuple[str, ...] = field(default=())  # for humans: an Event when applied


class UnsupportedModelSource(ValueError):
    """The model source cannot be read in a pod (the controller reports it on the status)."""


# --- names ----------------------------------------------------------------------------------------


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_INFERENCESERVICE: name}


def selector(name: str) -> str:
    """The pods' label selector as a string: status.selector, for the /scale subresource."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), LABEL_KIND: KIND, LABEL_MANAGED_BY: MANAGED_BY}


def url(name: str, namespace: str, cfg: BuildConfig = BuildConfig()) -> str:
    """In-cluster base URL of the OpenAI API (the Service listens on port 80)."""
    return f"http://{name}.{namespace}.svc.{cfg.cluster_domain}/v1"


def served_name(ref: ServiceRef, spec: InferenceServiceSpec) -> str:
    return spec.model.served_name or ref.name


def owner_reference(ref: ServiceRef) -> dict[str, Any]:
    return owned_by(ref, KIND)


def _metadata(ref: ServiceRef) -> dict[str, Any]:
    return {
        "name": ref.name,
        "namespace": ref.namespace,
        "labels": common_labels(ref.name),
        "ownerReferences": [owner_reference(ref)],
    }


# --- the model ------------------------------------------------------------------------------------


def model_location(spec: InferenceServiceSpec, cfg: BuildConfig = BuildConfig()) -> ModelLocation:
    """pvc://claim/path -> the claim mounted read-only at /mnt/pvc/<claim>; hostPath:///dir or /dir
    -> that directory mounted at the same path; hf://org/name and s3://bucket/prefix -> the storage
    initializer (an init container) downloads it into an emptyDir at /mnt/model, through the node
    model cache when the operator has one (then /mnt/model holds symlinks into the cache, which is
    mounted at its own path in both containers)."""
    source = spec.model.source
    user_paths = {m.get("mountPath") for m in spec.volume_mounts or ()}
    location = locate(source)
    if location is not None and location.kind == "pvc":
        volume = {
            "name": MODEL_VOLUME,
            "persistentVolumeClaim": {"claimName": location.claim, "readOnly": True},
        }
        return _mounted(location.path, location.mount_path, volume, user_paths)
    if location is not None:
        volume = {"name": MODEL_VOLUME, "hostPath": {"path": location.path, "type": "Directory"}}
        return _mounted(location.path, location.path, volume, user_paths)
    if source.startswith(("hf://", "s3://")):
        cache = cfg.model_cache
        where = "the node model cache (once per node)" if cache else "every replica, at start"
        return ModelLocation(
            path=MODEL_DIR,
            fetch_from=source,
            volumes=({"name": MODEL_VOLUME, "emptyDir": {}}, *([cache.volume()] if cache else [])),
            mounts=(
                {"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True},
                *([cache.mount()] if cache else []),
            ),
            notes=(
                f"model {source} is downloaded by the storage initializer into {where}: the pods need "
                "network access to it (and credentials in spec.env for private data); a pvc:// copy needs none",
            ),
        )
    raise UnsupportedModelSource(
        f"model source {source!r}: expected pvc://, hostPath://, an absolute path, hf:// or s3://"
    )


def _mounted(path: str, mount_path: str, volume: dict[str, Any], user_paths: set[Any]) -> ModelLocation:
    if mount_path in user_paths:  # the user mounts it (spec.volumes/volumeMounts): theirs wins
        return ModelLocation(path=path)
    return ModelLocation(
        path=path,
        volumes=(volume,),
        mounts=({"name": MODEL_VOLUME, "mountPath": mount_path, "readOnly": True},),
    )


# --- the server -----------------------------------------------------------------------------------


def serve_command(ref: ServiceRef, spec: InferenceServiceSpec, model_path: str) -> list[str]:
    """`lmforge serve` with the spec's engine settings (runtime/serve_args.py names)."""
    model, engine = spec.model, spec.engine
    command = [
        "lmforge", "serve", "--model", model_path, "--host", "0.0.0.0", "--port", str(SERVER_PORT),
        "--served-model-name", served_name(ref, spec), "--dtype", model.dtype,
    ]  # fmt: skip
    if model.max_model_len is not None:
        command += ["--max-model-len", str(model.max_model_len)]
    command += [
        "--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}",
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
        "--block-size", str(engine.block_size),
        "--enable-prefix-caching" if engine.prefix_caching else "--no-enable-prefix-caching",
        "--graceful-shutdown-seconds", str(spec.graceful_shutdown_seconds),
    ]  # fmt: skip
    if model.quantization is not None:  # default: detected from the checkpoint
        command += ["--quantization", model.quantization]
    if engine.kv_cache_dtype != "auto":
        command += ["--kv-cache-dtype", engine.kv_cache_dtype]
    if engine.enforce_eager:
        command.append("--enforce-eager")
    if engine.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    if engine.lora is not None:  # fixed by engine.lora, never by spec.adapters: loaded over HTTP
        lora = engine.lora
        command += [
            "--enable-lora", "--allow-runtime-lora-updating",
            "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank),
        ]  # fmt: skip
        if lora.max_cpu_loras is not None:
            command += ["--max-cpu-loras", str(lora.max_cpu_loras)]
    return command


# --- tensor parallelism ---------------------------------------------------------------------------

SHM_VOLUME = "dshm"  # NCCL (and the engine's step ring) need more than the runtime's 64 MiB /dev/shm


def nccl_env_from(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The NCCL_* variables of an environment (the operator's), sorted: BuildConfig.nccl_env."""
    return tuple(sorted((k, v) for k, v in environ.items() if k.startswith("NCCL_")))


def gpus_per_replica(spec: InferenceServiceSpec) -> int:
    """nvidia.com/gpu of each pod: the spec's limit, else tensorParallelSize when it is above 1 (one
    GPU per rank), else none asked for (0)."""
    limits = spec.resources.limits if spec.resources and spec.resources.limits else {}
    if "nvidia.com/gpu" in limits:
        return int(limits["nvidia.com/gpu"])
    return spec.engine.tensor_parallel_size if spec.engine.tensor_parallel_size > 1 else 0


def container_resources(spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """The spec's resources, with the GPU limit defaulted to tensorParallelSize (module docstring)."""
    resources = spec.resources.to_k8s() if spec.resources else {}
    limits = resources.get("limits") or {}
    if spec.engine.tensor_parallel_size > 1 and "nvidia.com/gpu" not in limits:
        resources["limits"] = {**limits, "nvidia.com/gpu": spec.engine.tensor_parallel_size}
    return resources or None


def parallel_layout(spec: InferenceServiceSpec, replicas: int) -> dict[str, Any]:
    """status.parallelism: what one replica is made of; the autoscaler counts replicas, never ranks."""
    tp, gpus = spec.engine.tensor_parallel_size, gpus_per_replica(spec)
    devices = f"{replicas * gpus} GPUs" if gpus else "CPU"
    return {
        "tensorParallelSize": tp,
        "gpusPerReplica": gpus,
        "layout": f"{replicas} replica{'s' if replicas != 1 else ''} x TP={tp} ({devices})",
    }


def server_env(
    ref: ServiceRef, spec: InferenceServiceSpec, location: ModelLocation, cfg: BuildConfig = BuildConfig()
) -> list[dict[str, Any]]:
    """Ours, then the user's; a user entry replaces ours of the same name."""
    ours: list[dict[str, Any]] = [
        {"name": "LMFORGE_INFERENCESERVICE", "value": ref.name},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *location.env,
    ]
    if spec.engine.tensor_parallel_size > 1:
        ours += [{"name": k, "value": v} for k, v in cfg.nccl_env]
    if spec.api_key_secret is not None:  # `lmforge serve` reads --api-key from this env by default
        ours.append(
            {
                "name": "LMFORGE_API_KEY",
                "valueFrom": {
                    "secretKeyRef": {"name": spec.api_key_secret.name, "key": spec.api_key_secret.key}
                },
            }
        )
    user = [dict(e) for e in spec.env or ()]
    overridden = {e.get("name") for e in user}
    return [e for e in ours if e["name"] not in overridden] + user


def probes(spec: InferenceServiceSpec, cfg: BuildConfig = BuildConfig()) -> dict[str, Any]:
    health = {"path": "/health", "port": PORT_NAME}
    period = cfg.startup_period_seconds
    return {
        "startupProbe": {
            "httpGet": health,
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": -(-spec.startup_timeout_seconds // period),
        },
        "readinessProbe": {
            "httpGet": health,
            "periodSeconds": cfg.readiness_period_seconds,
            "timeoutSeconds": 3,
            "successThreshold": 1,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/version", "port": PORT_NAME},
            "periodSeconds": cfg.liveness_period_seconds,
            "timeoutSeconds": 5,
            "failureThreshold": cfg.liveness_failure_threshold,
        },
    }


def termination_grace_seconds(spec: InferenceServiceSpec, cfg: BuildConfig = BuildConfig()) -> int:
    return cfg.pre_stop_sleep_seconds + spec.graceful_shutdown_seconds + ENGINE_SHUTDOWN_MARGIN_SECONDS


def pod_template(
    ref: ServiceRef, spec: InferenceServiceSpec, cfg: BuildConfig = BuildConfig()
) -> dict[str, Any]:
    location = model_location(spec, cfg)
    image = spec.image or cfg.default_image
    lora_volumes, lora_mounts = adapter_root_volumes(spec)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": serve_command(ref, spec, location.path),
        "env": server_env(ref, spec, location, cfg),
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        **probes(spec, cfg),
        "lifecycle": {"preStop": {"sleep": {"seconds": cfg.pre_stop_sleep_seconds}}},
        "volumeMounts": [*location.mounts, *lora_mounts, *(spec.volume_mounts or ())],
    }
    resources = container_resources(spec)
    if resources:
        container["resources"] = resources
    volumes = [*location.volumes, *lora_volumes, *(spec.volumes or ())]
    if spec.engine.tensor_parallel_size > 1:  # /dev/shm in RAM, as large as the pod's memory allows
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    pod_spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec, cfg),
        "containers": [container],
        "volumes": volumes,
    }
    if location.fetch_from is not None:
        pod_spec["initContainers"] = [
            storage_initializer(
                image=image,
                pull_policy=cfg.image_pull_policy,
                source=location.fetch_from,
                target=location.path,
                mounts=[{"name": MODEL_VOLUME, "mountPath": location.path}],
                env=[dict(e) for e in spec.env or ()],
                cache=cfg.model_cache,
            )
        ]
    optional = {"nodeSelector": spec.node_selector, "tolerations": spec.tolerations}
    pod_spec.update({k: v for k, v in optional.items() if v})
    return {
        "metadata": {
            "labels": common_labels(ref.name),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(SERVER_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


# --- the owned objects ----------------------------------------------------------------------------


def deployment(
    ref: ServiceRef, spec: InferenceServiceSpec, replicas: int, cfg: BuildConfig = BuildConfig()
) -> dict[str, Any]:
    """`replicas` is the controller's choice (spec.replicas, or the autoscaler's current size)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ref),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(ref.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 300,
            "revisionHistoryLimit": cfg.revision_history_limit,
            "template": pod_template(ref, spec, cfg),
        },
    }


def service(ref: ServiceRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ref.name),
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def max_possible_replicas(spec: InferenceServiceSpec) -> int:
    return spec.autoscaling.max_replicas if spec.autoscaling else spec.replicas


def pod_disruption_budget(ref: ServiceRef, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """One replica at a time may be evicted (node drains), and only when more than one can exist:
    a PDB on a single replica would block drains forever. Crash-looping pods may always be evicted."""
    if max_possible_replicas(spec) <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(ref.name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def initial_replicas(spec: InferenceServiceSpec) -> int:
    """Replicas for a new Deployment: spec.replicas, clamped to the autoscaling bounds."""
    if spec.autoscaling is None:
        return spec.replicas
    return clamp(spec.replicas, spec.autoscaling.min_replicas, spec.autoscaling.max_replicas)


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def replicas_to_apply(spec: InferenceServiceSpec, current: int | None, replicas_changed: bool) -> int:
    """The Deployment size the controller applies. Without autoscaling: spec.replicas, always.
    With it: the Deployment's current size (the autoscaler owns it), clamped to the bounds; a new
    Deployment starts at spec.replicas; a change of spec.replicas (`kubectl scale`) sets the size
    once, e.g. to wake a service scaled to zero, and the autoscaler goes on from there."""
    if spec.autoscaling is None:
        return spec.replicas
    if current is None or replicas_changed:
        return initial_replicas(spec)
    return clamp(current, spec.autoscaling.min_replicas, spec.autoscaling.max_replicas)
