"""Pure builders of the objects a QuantizeJob owns: one batch/v1 Job whose single pod runs
`lmforge quantize`, and (spec.serveAfter, once the job succeeded) an InferenceService serving the
output.

No client import and no I/O: spec model in, manifest dicts out (tests compare whole objects). Names
are the QuantizeJob's (the Job) and serveAfter.name (the InferenceService), so creating twice is an
AlreadyExists, never a duplicate.

Storage, as for the other kinds: pvc://<claim>/<path> mounts the claim at /mnt/pvc/<claim> (one volume
per claim, read-write when the output is on it); hostPath:///<dir> and plain absolute paths mount that
path at the same place (the model read-only, the calibration file read-only, the output created if
missing); hf://org/name and s3://bucket/prefix models are downloaded in the pod (network access
and, for S3, AWS_* credentials in spec.env), an s3:// output is uploaded by the pod when done (its
manifest last); anything else is UnsupportedLocation (the controller fails the job with InvalidSpec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.operator.api.constants import (
    ANNOTATION_FATE,
    API_VERSION,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from lmforge.operator.api.inferenceservice import InferenceServiceSpec
from lmforge.operator.api.quantizejob import QuantizeJobSpec
from lmforge.operator.builders.owner import OwnerRef
from lmforge.operator.builders.owner import owner_reference as owned_by
from lmforge.operator.builders.storage import locate

KIND = "QuantizeJob"
LABEL_QUANTIZEJOB = "lmforge.dev/quantizejob"
# JSON the pod puts on itself when done: {sizeBytesBefore, sizeBytesAfter, klDivergence,
# top1Agreement, outputPath} (runtime/quantize/report.py), folded into status.result.
ANNOTATION_RESULT = "lmforge.dev/result"
# QuantizeJob annotations copied onto the pod template: the local cluster's (kwok) pod fate knobs.
POD_ANNOTATIONS_PASSED = (ANNOTATION_FATE, f"{ANNOTATION_FATE}-delay")
CONTAINER_NAME = "quantize"
DEFAULT_IMAGE = "ghcr.io/lmforge/runtime:0.1.0"


JobRef = OwnerRef  # the QuantizeJob the objects belong to


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """Operator-wide settings (see `build_config_from_env` in the controller)."""

    default_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None  # lets the pod annotate itself with its result


class UnsupportedLocation(ValueError):
    """A location the pod cannot read or write (the controller reports it on the status)."""


@dataclass(frozen=True, slots=True)
class Storage:
    """The runtime's paths and what the pod needs to see them."""

    model: str
    output: str
    calibration: str | None
    volumes: tuple[dict[str, Any], ...]
    mounts: tuple[dict[str, Any], ...]


# --- names ----------------------------------------------------------------------------------------


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_QUANTIZEJOB: name}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), LABEL_KIND: KIND, LABEL_MANAGED_BY: MANAGED_BY}


def owner_reference(ref: JobRef) -> dict[str, Any]:
    return owned_by(ref, KIND)


def _metadata(ref: JobRef, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": common_labels(ref.name),
        "ownerReferences": [owner_reference(ref)],
    }


# --- storage --------------------------------------------------------------------------------------


def storage(spec: QuantizeJobSpec) -> Storage:
    """Paths for `lmforge quantize` and the volumes/mounts behind them (see the module doc)."""
    user_paths = {m.get("mountPath") for m in spec.volume_mounts or ()}
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []

    def place(uri: str, role: str, host_type: str, writable: bool) -> str:
        location = locate(uri)
        if location is not None and location.kind == "pvc":
            name = location.pvc_volume_name
            existing = next((m for m in mounts if m["name"] == name), None)
            if existing is not None:
                if writable:  # the output shares the claim: the one mount must be writable
                    existing.pop("readOnly", None)
                    next(v for v in volumes if v["name"] == name)["persistentVolumeClaim"].pop(
                        "readOnly", None
                    )
            elif location.mount_path not in user_paths:
                claim_ref = {"claimName": location.claim, **({} if writable else {"readOnly": True})}
                volumes.append({"name": name, "persistentVolumeClaim": claim_ref})
                mounts.append(
                    {
                        "name": name,
                        "mountPath": location.mount_path,
                        **({} if writable else {"readOnly": True}),
                    }
                )
            return location.path
        if location is not None:
            path = location.path
            if path not in user_paths and all(m["mountPath"] != path for m in mounts):
                volumes.append({"name": role, "hostPath": {"path": path, "type": host_type}})
                mounts.append({"name": role, "mountPath": path, **({} if writable else {"readOnly": True})})
            return path
        if uri.startswith("hf://") and role == "model":
            return uri  # the runtime downloads it
        if uri.startswith("s3://") and role in ("model", "output"):
            return uri  # the runtime downloads / uploads it (lmforge.runtime.storage)
        raise UnsupportedLocation(
            f"{role} {uri!r}: a QuantizeJob reads and writes pvc://, hostPath:// or absolute paths"
            + (" (models also from hf:// and s3://, outputs also to s3://)" if role != "calibration" else "")
            + "; copy the data to a PVC first"
        )

    model = place(spec.model, "model", "Directory", writable=False)
    calibration = (
        place(spec.calibration.dataset, "calibration", "File", writable=False) if spec.calibration else None
    )
    output = place(spec.output, "output", "DirectoryOrCreate", writable=True)
    return Storage(
        model=model, output=output, calibration=calibration, volumes=tuple(volumes), mounts=tuple(mounts)
    )


# --- the pod --------------------------------------------------------------------------------------


def quantize_command(spec: QuantizeJobSpec, paths: Storage) -> list[str]:
    """`lmforge quantize` (runtime/quantize_args.py flags); lm_head is always kept by the runtime."""
    command = [
        "lmforge",
        "quantize",
        "--model",
        paths.model,
        "--method",
        spec.method,
        "--output",
        paths.output,
    ]
    if spec.group_size is not None:
        command += ["--group-size", str(spec.group_size)]
    for name in spec.ignore:
        if name != "lm_head":
            command += ["--ignore", name]
    if spec.calibration is not None and paths.calibration is not None:
        command += [
            "--calibration",
            paths.calibration,
            "--samples",
            str(spec.calibration.samples),
            "--seq-len",
            str(spec.calibration.seq_len),
        ]
    return command


def pod_env(ref: JobRef, spec: QuantizeJobSpec) -> list[dict[str, Any]]:
    """Ours (the downward API for the result annotation), then the user's; a user entry replaces
    ours of the same name."""
    ours: list[dict[str, Any]] = [
        {"name": "LMFORGE_QUANTIZEJOB", "value": ref.name},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.model.startswith("hf://"):
        ours.append({"name": "HF_HOME", "value": "/tmp/huggingface"})
    user = [dict(e) for e in spec.env or ()]
    overridden = {e.get("name") for e in user}
    return [e for e in ours if e["name"] not in overridden] + user


def pod_template(
    ref: JobRef,
    spec: QuantizeJobSpec,
    annotations: dict[str, str] | None = None,
    cfg: BuildConfig = BuildConfig(),
) -> dict[str, Any]:
    paths = storage(spec)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or cfg.default_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": quantize_command(spec, paths),
        "env": pod_env(ref, spec),
        "terminationMessagePolicy": "FallbackToLogsOnError",  # the runtime writes its error there
        "volumeMounts": [*paths.mounts, *(spec.volume_mounts or ())],
    }
    if spec.resources:  # quantities as strings, the form the API (and its clients) expect
        container["resources"] = {
            section: {k: str(v) for k, v in table.items()}
            for section, table in spec.resources.to_k8s().items()
        }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [*paths.volumes, *(spec.volumes or ())],
    }
    optional = {
        "serviceAccountName": cfg.service_account,
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    metadata: dict[str, Any] = {"labels": common_labels(ref.name)}
    passed = {k: v for k, v in (annotations or {}).items() if k in POD_ANNOTATIONS_PASSED}
    if passed:
        metadata["annotations"] = passed
    return {"metadata": metadata, "spec": pod_spec}


def job(
    ref: JobRef,
    spec: QuantizeJobSpec,
    annotations: dict[str, str] | None = None,
    cfg: BuildConfig = BuildConfig(),
) -> dict[str, Any]:
    """One pod, never retried (backoffLimit 0): a failed quantization is reported, not rerun."""
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": pod_template(ref, spec, annotations, cfg)}
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(ref, ref.name), "spec": job_spec}


# --- serveAfter -----------------------------------------------------------------------------------


S3_ENV_PREFIXES = ("AWS_", "LMFORGE_S3_")  # what reaching the bucket needs (endpoint, region, credentials)


def inference_service(ref: JobRef, spec: QuantizeJobSpec) -> dict[str, Any] | None:
    """The InferenceService of spec.serveAfter, serving spec.output (quantization detected from its
    config.json), owned by the QuantizeJob, placed where the job ran (its nodeSelector and
    tolerations), with the job's AWS_* / LMFORGE_S3_* env when the output is on S3; None without
    serveAfter."""
    if spec.serve_after is None:
        return None
    isvc_spec: dict[str, Any] = {"model": {"source": spec.output}, "replicas": spec.serve_after.replicas}
    if spec.node_selector:
        isvc_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        isvc_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.output.startswith("s3://"):  # the servers' storage initializer reads the same bucket
        storage_env = [dict(e) for e in spec.env or () if str(e.get("name", "")).startswith(S3_ENV_PREFIXES)]
        if storage_env:
            isvc_spec["env"] = storage_env
    InferenceServiceSpec.model_validate(isvc_spec)  # only what we set: the API server fills the defaults
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": _metadata(ref, spec.serve_after.name),
        "spec": isvc_spec,
    }
