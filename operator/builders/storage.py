"""Where a storage URI of a spec (`pvc://<claim>/<path>`, `hostPath:///<dir>`, `/<dir>`) lives
inside a pod. One convention for every kind, so a checkpoint a TrainJob writes to
`pvc://models/x` is the same path a QuantizeJob or an InferenceService reads: each claim is
mounted at /mnt/pvc/<claim>, host directories at their own path. Which volumes a builder then
mounts, and read-only or not, stays the builder's policy."""

from __future__ import annotations

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
