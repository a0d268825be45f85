"""What the TrainJob policy reads from the cluster: a worker pod (`WorkerPod.from_pod`) and rank 0's
progress report (`fold_progress`). Pure: dicts as the API returns them in, frozen values out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lmforge.operator import clock
from lmforge.operator.api import constants as c
from lmforge.operator.api.trainjob import Progress
from lmforge.operator.builders.trainjob import CONTAINER_NAME


@dataclass(frozen=True, slots=True)
class WorkerPod:
    """What the policy needs to know about one worker pod."""

    name: str
    rank: int
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    node: str | None = None
    finished_at: datetime | None = None
    deletion_timestamp: datetime | None = None  # set: Terminating; the pod should be gone by then
    progress: str | None = None  # raw lmforge.dev/progress annotation
    waiting: str | None = None  # why a Pending pod is not running yet (Unschedulable, ImagePullBackOff, ...)
    spec_hash: str | None = (
        None  # lmforge.dev/spec-hash: the spec the pod was built from (None: an older operator)
    )

    @property
    def deleting(self) -> bool:
        return self.deletion_timestamp is not None

    @property
    def active(self) -> bool:
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> WorkerPod | None:
        """Parse a pod (dict as the API returns it); None if it is not a worker pod."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            rank, attempt = int(labels[c.LABEL_RANK]), int(labels[c.LABEL_RESTART])
        except (KeyError, TypeError, ValueError):
            return None
        status = pod.get("status") or {}
        statuses = status.get("containerStatuses") or []
        main = next((s for s in statuses if s.get("name") == CONTAINER_NAME), statuses[0] if statuses else {})
        terminated = (main.get("state") or {}).get("terminated") or {}
        conditions = status.get("conditions") or ()
        ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in conditions)
        unscheduled = next(
            (
                cond
                for cond in conditions
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False"
            ),
            None,
        )
        waiting = (main.get("state") or {}).get("waiting") or unscheduled or {}
        return cls(
            name=meta.get("name", ""),
            rank=rank,
            attempt=attempt,
            phase=status.get("phase") or "Pending",
            ready=ready,
            exit_code=terminated.get("exitCode"),
            reason=terminated.get("reason") or status.get("reason"),
            message=terminated.get("message") or status.get("message"),
            node=(pod.get("spec") or {}).get("nodeName"),
            finished_at=clock.parse_time(terminated.get("finishedAt")),
            deletion_timestamp=clock.parse_time(meta.get("deletionTimestamp")),
            progress=(meta.get("annotations") or {}).get(c.ANNOTATION_PROGRESS),
            waiting=": ".join(filter(None, (waiting.get("reason"), waiting.get("message")))) or None,
            spec_hash=(meta.get("annotations") or {}).get(c.ANNOTATION_SPEC_HASH),
        )


def format_duration(seconds: float) -> str:
    """4000 -> '1h6m', 75 -> '1m15s', 9 -> '9s'."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def failure_detail(pod: WorkerPod) -> str:
    parts = [f"exit code {pod.exit_code}" if pod.exit_code is not None else "no exit code"]
    if pod.reason:
        parts.append(pod.reason)
    if pod.node:
        parts.append(f"node {pod.node}")
    return ", ".join(parts)


def fold_progress(current: Progress | None, raw: str | None, now: datetime) -> Progress | None:
    """Rank 0's progress annotation -> status.progress. Garbage is ignored (keeps the last good
    report); updateTime moves only when the report changes, so a quiet job writes nothing."""
    if not raw:
        return current
    try:
        report = json.loads(raw)
        if not isinstance(report, dict):
            return current
        step = _opt(int, report.get("step"))
        total = _opt(int, report.get("totalSteps"))
        eta_seconds = _opt(int, report.get("etaSeconds"))
        folded = Progress(
            step=step,
            total_steps=total,
            summary=f"{step}/{total}" if step is not None and total is not None else None,
            epoch=_opt(float, report.get("epoch")),
            loss=_opt(float, report.get("loss")),
            tokens_per_second=_opt(float, report.get("tokensPerSecond")),
            eta_seconds=eta_seconds,
            eta=format_duration(eta_seconds) if eta_seconds is not None else None,
            last_checkpoint=_opt(str, report.get("lastCheckpoint")),
        )
    except (TypeError, ValueError):
        return current
    if current is not None and folded == current.model_copy(update={"update_time": None}):
        return current
    return folded.model_copy(update={"update_time": now})


def _opt(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)
