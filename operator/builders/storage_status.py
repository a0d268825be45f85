"""The pods' storage-initializer reports (annotation lmforge.dev/fetch, JSON written by `lmforge
fetch`) -> InferenceService.status.model: download progress while replicas start, and whether
they started warm from the node model cache. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.operator.api.inferenceservice import ModelFetchStatus
from lmforge.operator.builders.storage import FETCH_ANNOTATION


def fetch_report(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(FETCH_ANNOTATION)
    try:
        report = json.loads(raw) if raw else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def model_status(source: str, pods: Sequence[Mapping[str, Any]]) -> ModelFetchStatus | None:
    """None for a local model (no pod reports). `cached` is the newest finished replica's."""
    if not source.startswith(("hf://", "s3://")):
        return None
    reports = [
        (str((p.get("metadata") or {}).get("creationTimestamp") or ""), r)
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        if (r := fetch_report(p)) is not None and r.get("uri") == source
    ]
    done = sorted(((t, r) for t, r in reports if r.get("phase") == "Done"), key=lambda tr: tr[0])
    running = [r for _, r in reports if r.get("phase") != "Done"]
    status = ModelFetchStatus(source=source, downloading=len(running))
    if done:
        newest = done[-1][1]
        status.revision = newest.get("revision")
        status.cached = bool(newest.get("cached"))
        status.cached_replicas = sum(bool(r.get("cached")) for _, r in done)
        status.bytes = newest.get("bytes")
    if running:
        slowest = max(running, key=lambda r: r.get("etaSeconds") or 0)
        status.bytes, status.total_bytes = slowest.get("bytes"), slowest.get("totalBytes")
        status.eta_seconds = slowest.get("etaSeconds")
    return status


def initializer_failure(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The storage initializer's latest failure on this pod ({exitCode, reason, message}: the
    message is `lmforge fetch`'s error, naming the URI), or None. A failing init container keeps
    the server container waiting in PodInitializing, so the pod's failure is only visible here."""
    from lmforge.operator.builders.storage import STORAGE_INITIALIZER

    for status in (pod.get("status") or {}).get("initContainerStatuses") or ():
        if status.get("name") != STORAGE_INITIALIZER:
            continue
        state, last = status.get("state") or {}, status.get("lastState") or {}
        terminated = state.get("terminated") or last.get("terminated") or {}
        if terminated and terminated.get("exitCode") not in (None, 0):
            return {
                "exitCode": terminated.get("exitCode"),
                "reason": (state.get("waiting") or {}).get("reason") or terminated.get("reason"),
                "message": terminated.get("message"),
            }
    return None
