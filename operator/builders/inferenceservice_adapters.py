"""LoRA adapters of an InferenceService: where each one lives inside the pods, the fixed volumes the
pod template mounts for them, and the per-pass plan (pure; operator/adapter_sync.py decides the
load/unload calls per replica).

The rule that keeps adapter changes restart-free: the pod template depends on spec.engine.lora only
(flags and its adapterRoots volumes), never on spec.adapters. So an adapter must sit on a volume every
replica mounts already:
- under one of spec.engine.lora.adapterRoots (pvc://<claim> mounted read-only at /mnt/pvc/<claim>,
  hostPath:///<dir> at <dir>), e.g. where TrainJobs write (the TrainJob output dir convention of
  builders/storage.py is the same path in every pod);
- under the model's claim (a pvc:// model mounts the whole claim);
- under a spec.volumeMounts mountPath.
An adapter elsewhere (or hf://: the server loads adapters from local disk) is InvalidSpec naming the
field; a TrainJob whose output is elsewhere gets a lastError on its adapter (it is not our spec).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmforge.operator.api.inferenceservice import InferenceServiceSpec
from lmforge.operator.builders.storage import locate

ROOT_VOLUME_PREFIX = "lora-root"


@dataclass(frozen=True, slots=True)
class TrainJobView:
    """What the InferenceService needs to know about a TrainJob of its namespace (kopf index)."""

    name: str
    method: str = "lora"
    phase: str | None = None
    output_dir: str = ""
    serve_on: str | None = None  # spec.serveAfter.inferenceService
    adapter_name: str | None = None  # spec.serveAfter.adapterName (default: the job's name)

    @classmethod
    def from_trainjob(cls, body: Mapping[str, Any]) -> TrainJobView:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        serve = spec.get("serveAfter") or {}
        return cls(
            name=str(body.get("metadata", {}).get("name", "")),
            method=str(spec.get("method", "lora")),
            phase=status.get("phase"),
            output_dir=str((spec.get("output") or {}).get("dir", "")),
            serve_on=serve.get("inferenceService"),
            adapter_name=serve.get("adapterName"),
        )


def _roots(spec: InferenceServiceSpec) -> list[tuple[str, dict[str, Any] | None]]:
    """(in-pod directory, the volume the template adds for it or None when mounted anyway)."""
    lora = spec.engine.lora
    model = locate(spec.model.source)
    user = [str(m.get("mountPath", "")).rstrip("/") for m in spec.volume_mounts or () if m.get("mountPath")]
    out: list[tuple[str, dict[str, Any] | None]] = [(path, None) for path in user]
    if model is not None and model.kind == "pvc":
        out.append((model.mount_path, None))
    for index, uri in enumerate(lora.adapter_roots if lora else ()):
        location = locate(uri)
        if location is None:
            raise ValueError(
                f"spec.engine.lora.adapterRoots[{index}] {uri!r}: must be pvc://<claim> or hostPath://"
            )
        mount = location.mount_path if location.kind == "pvc" else location.path
        if any(mount == existing for existing, _ in out):
            continue
        name = f"{ROOT_VOLUME_PREFIX}-{index}"
        if location.kind == "pvc":
            volume = {"name": name, "persistentVolumeClaim": {"claimName": location.claim, "readOnly": True}}
        else:
            volume = {"name": name, "hostPath": {"path": location.path, "type": "Directory"}}
        out.append((mount, volume))
    return out


def root_volumes(spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The template's volumes and read-only mounts for spec.engine.lora.adapterRoots."""
    volumes, mounts = [], []
    for mount, volume in _roots(spec):
        if volume is not None:
            volumes.append(volume)
            mounts.append({"name": volume["name"], "mountPath": mount, "readOnly": True})
    return volumes, mounts


def in_pod_path(uri: str, spec: InferenceServiceSpec, field: str) -> str:
    """The adapter directory inside the pods; ValueError naming `field` when no mounted volume holds it."""
    location = locate(uri)
    if location is None:
        raise ValueError(
            f"{field} {uri!r}: adapters are loaded from local disk: use pvc://, hostPath:// or /<dir> "
            "(copy hf:// adapters to a PVC first)"
        )
    roots = [root for root, _ in _roots(spec)]
    if not any(location.path == root or location.path.startswith(root.rstrip("/") + "/") for root in roots):
        raise ValueError(
            f"{field} {uri!r}: not on a volume the pods mount ({', '.join(roots) or 'none'}); add its volume to "
            "spec.engine.lora.adapterRoots (pods restart once) so adapters there load without a restart"
        )
    return location.path


@dataclass(frozen=True, slots=True)
class Wanted:
    """The adapters to serve now (name -> in-pod directory) and why the others are not served."""

    paths: dict[str, str]
    errors: dict[str, str]
    names: tuple[str, ...]  # every adapter the status lists, in order


def wanted(name: str, spec: InferenceServiceSpec, trainjobs: Iterable[TrainJobView]) -> Wanted:
    """spec.adapters (sources checked here: ValueError for an invalid one) and the Succeeded TrainJobs
    whose serveAfter names this service. A spec entry wins over a serveAfter of the same name."""
    jobs = {job.name: job for job in trainjobs}
    paths: dict[str, str] = {}
    errors: dict[str, str] = {}
    names: list[str] = []
    for index, adapter in enumerate(spec.adapters):
        names.append(adapter.name)
        if adapter.source is not None:
            paths[adapter.name] = in_pod_path(adapter.source, spec, f"spec.adapters[{index}].source")
            continue
        job = jobs.get(adapter.from_train_job or "")
        _from_job(adapter.name, job, adapter.from_train_job or "", spec, paths, errors)
    for job in sorted(jobs.values(), key=lambda j: j.name):
        adapter_name = job.adapter_name or job.name
        if job.serve_on == name and adapter_name not in names:
            names.append(adapter_name)
            _from_job(adapter_name, job, job.name, spec, paths, errors)
    return Wanted(paths, errors, tuple(names))


def _from_job(
    adapter: str, job: TrainJobView | None, job_name: str, spec: InferenceServiceSpec,
    paths: dict[str, str], errors: dict[str, str],
) -> None:  # fmt: skip
    if job is None:
        errors[adapter] = f"TrainJob {job_name} not found"
    elif job.method != "lora":
        errors[adapter] = f"TrainJob {job_name} has method {job.method}: it writes no adapter"
    elif job.phase != "Succeeded":
        errors[adapter] = f"waiting for TrainJob {job_name} to succeed (phase {job.phase or 'Pending'})"
    else:
        try:
            paths[adapter] = in_pod_path(job.output_dir, spec, f"TrainJob {job_name} output.dir")
        except ValueError as exc:
            errors[adapter] = str(exc)


def summary(entries: Iterable[Mapping[str, Any]], ready: int) -> str | None:
    """ "sql 2/2, chat 0/2" for the printer column; None without adapters."""
    parts = [f"{e['name']} {len(e.get('replicas') or ())}/{ready}" for e in entries]
    return ", ".join(parts) or None
