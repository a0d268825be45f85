"""Where a storage URI of a spec (`pvc://<claim>/<path>`, `hostPath:///<dir>`, `/<dir>`) lives
inside a pod. One convention for every kind, so a checkpoint a TrainJob writes to
`pvc://models/x` is the same path a QuantizeJob or an InferenceService reads: each claim is
mounted at /mnt/pvc/<claim>, host directories at their own path. Which volumes a builder then
mounts, and read-only or not, stays the builder's policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PVC_ROOT = "/mnt/pvc"  # the runtime resolves pvc://<claim>/<path> to $LMFORGE_PVC_ROOT/<claim>/<path>


@dataclass(frozen=True, slots=True)
class Location:
    kind: Literal["pvc", "hostPath", "path"]  # path: a plain absolute path (no scheme)
    mount_path: str  # /mnt/pvc/<claim>, or the host directory itself
    path: str  # what the pod opens: mount_path plus the path inside the claim
    claim: str | None = None

    @property
    def pvc_volume_name(self) -> str:
        return f"pvc-{self.claim}"[:63].rstrip("-")


def locate(uri: str) -> Location | None:
    """The in-pod location of a local URI; None for remote ones (hf://, s3://) that the runtime
    fetches itself or the builder refuses."""
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://") :].partition("/")
        root = f"{PVC_ROOT}/{claim}"
        inner = rest.strip("/")
        return Location("pvc", root, f"{root}/{inner}" if inner else root, claim)
    if uri.startswith("hostPath://"):
        directory = uri[len("hostPath://") :].rstrip("/") or "/"
        return Location("hostPath", directory, directory)
    if uri.startswith("/"):
        directory = uri.rstrip("/") or "/"
        return Location("path", directory, directory)
    return None


# --- the storage initializer ------------------------------------------------------------------------

STORAGE_INITIALIZER = "storage-initializer"
FETCH_ANNOTATION = "lmforge.dev/fetch"  # the initializer's progress/result on its own pod (JSON)
MODEL_CACHE_VOLUME = "model-cache"


@dataclass(frozen=True, slots=True)
class ModelCache:
    """The opt-in node model cache (Helm values `modelCache`): a host directory shared by every
    pod on a node, mounted at the same path in the initializer and the server (the model
    directory holds symlinks into it)."""

    host_path: str
    max_size: str | None = None  # e.g. 200Gi; None: no limit

    def volume(self) -> dict[str, object]:
        return {"name": MODEL_CACHE_VOLUME, "hostPath": {"path": self.host_path, "type": "DirectoryOrCreate"}}

    def mount(self) -> dict[str, object]:
        return {"name": MODEL_CACHE_VOLUME, "mountPath": self.host_path}


def fetch_command(source: str, target: str, cache: ModelCache | None, repo_type: str = "model") -> list[str]:
    """`lmforge fetch SRC DST` (+ the node cache flags)."""
    command = ["lmforge", "fetch", source, target]
    if repo_type != "model":
        command += ["--repo-type", repo_type]
    if cache is not None:
        command += ["--cache-dir", cache.host_path]
        if cache.max_size:
            command += ["--cache-max-bytes", cache.max_size]
    return command


def storage_initializer(
    *,
    image: str,
    pull_policy: str,
    source: str,
    target: str,
    mounts: list[dict[str, object]],
    env: list[dict[str, object]],
    cache: ModelCache | None,
    resources: dict[str, object] | None = None,
) -> dict[str, object]:
    """The init container that downloads `source` into `target` (an emptyDir mounted through
    `mounts`) before the main container starts. `env` is the user's (AWS_* / HF_* from Secrets);
    POD_NAME/POD_NAMESPACE let it annotate its pod with progress."""
    ours: list[dict[str, object]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    names = {e.get("name") for e in env}
    container: dict[str, object] = {
        "name": STORAGE_INITIALIZER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": fetch_command(source, target, cache),
        "env": [e for e in ours if e["name"] not in names] + list(env),
        "volumeMounts": [*mounts, *([cache.mount()] if cache else [])],
        "terminationMessagePolicy": "FallbackToLogsOnError",  # `lmforge fetch` writes its error there
    }
    if resources:
        container["resources"] = resources
    return container


CACHE_HOSTPATH_ENV = "LMFORGE_MODEL_CACHE_HOSTPATH"
CACHE_MAX_SIZE_ENV = "LMFORGE_MODEL_CACHE_MAX_SIZE"


def model_cache_from_env(env: Mapping[str, str]) -> ModelCache | None:
    """The operator's node model cache setting (Helm values modelCache -> these variables)."""
    path = env.get(CACHE_HOSTPATH_ENV)
    if not path:
        return None
    if not path.startswith("/"):
        raise ValueError(f"{CACHE_HOSTPATH_ENV}={path!r}: must be an absolute host path")
    return ModelCache(path.rstrip("/") or "/", env.get(CACHE_MAX_SIZE_ENV) or None)
