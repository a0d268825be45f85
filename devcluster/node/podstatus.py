"""Container states -> the pod's `status` (pure). Written with a strategic-merge patch:
conditions merge by type (the scheduler's PodScheduled stays), containerStatuses is replaced whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ContainerState:
    """What the agent knows about one container; `state` is waiting | running | terminated."""

    name: str
    image: str = ""
    state: str = "waiting"
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    last_terminated: dict[str, Any] | None = field(default=None)

    def terminated_dict(self) -> dict[str, Any]:
        out = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": f"process://{self.name}",
        }
        if self.message:
            out["message"] = self.message
        return out

    def to_k8s(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_dict()}
        else:
            state = {
                "waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}
            }
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "state": state,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.state != "waiting" or self.restart_count:
            out["containerID"] = f"process://{self.name}"
        return out


def init_outcome(init: list[ContainerState], restart_policy: str) -> str:
    """Init containers run one by one, each to exit 0: "done" when all did, "failed" when one
    failed for good (restartPolicy Never; otherwise the kubelet restarts it), else "running"."""
    for state in init:
        if state.state == "terminated" and state.exit_code == 0:
            continue
        if state.state == "terminated" and restart_policy == "Never":
            return "failed"
        return "running"
    return "done"


def phase(containers: list[ContainerState], restart_policy: str, init: str = "done") -> str:
    """Kubelet's rule: Pending while init containers run and until every container started once;
    Failed when an init container failed for good; Succeeded/Failed once all are terminated for
    good (Never, or OnFailure with exit 0); else Running."""
    if init == "failed":
        return "Failed"
    if init == "running":
        return "Pending"
    if any(c.state == "waiting" and c.restart_count == 0 and c.last_terminated is None for c in containers):
        return "Pending"
    if all(c.state == "terminated" for c in containers):
        if all(c.exit_code == 0 for c in containers):
            return "Succeeded"
        return "Failed"
    return "Running"


def pod_status(
    containers: list[ContainerState],
    restart_policy: str,
    pod_ip: str,
    host_ip: str,
    start_time: str,
    transition_time: str,
    reason: str | None = None,
    message: str | None = None,
    init_containers: list[ContainerState] | None = None,
) -> dict[str, Any]:
    init = init_outcome(init_containers or [], restart_policy)
    current = phase(containers, restart_policy, init)
    ready = current == "Running" and all(c.ready for c in containers)
    not_ready = [c.name for c in containers if not c.ready]
    why = (
        {}
        if ready
        else {
            "reason": "PodCompleted" if current in ("Succeeded", "Failed") else "ContainersNotReady",
            "message": f"containers with unready status: [{' '.join(not_ready)}]",
        }
    )

    def condition(kind: str, status: bool, extra: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "type": kind,
            "status": "True" if status else "False",
            "lastProbeTime": None,
            "lastTransitionTime": transition_time,
            **(extra or {}),
        }

    status: dict[str, Any] = {
        "phase": current,
        "conditions": [
            condition(
                "Initialized",
                init == "done",
                {}
                if init == "done"
                else {
                    "reason": "ContainersNotInitialized",
                    "message": "containers with incomplete status: ["
                    + " ".join(
                        c.name for c in init_containers or [] if c.exit_code != 0 or c.state != "terminated"
                    )
                    + "]",
                },
            ),
            condition("ContainersReady", ready, why),
            condition("Ready", ready, why),
        ],
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": [c.to_k8s() for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [c.to_k8s() for c in init_containers]
    if reason:
        status["reason"] = reason
        status["message"] = message or ""
    return status
