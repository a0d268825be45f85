"""The custom resource that built objects belong to, and the ownerReference that says so.

Every child (pods, Services, ConfigMaps, Deployments, Jobs) carries a controller ownerReference to
its TrainJob / InferenceService / QuantizeJob, so Kubernetes' garbage collector deletes it with
the parent even when the operator is not running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.operator.api.constants import API_VERSION


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """Identity of the custom resource the objects belong to."""

    name: str
    namespace: str
    uid: str


def owner_reference(ref: OwnerRef, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
