"""The process node's Node object, its status heartbeat and its Lease (pure builders).

Not annotated `kwok.x-k8s.io/node`, so kwok leaves it alone; tainted so that only pods that
tolerate `lmforge.dev/process-node` (and usually select `lmforge.dev/node-type: process`) land here.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from typing import Any

NODE_NAME = "lmforge-local"
LABEL_NODE_TYPE = ("lmforge.dev/node-type", "process")
TAINT_KEY = "lmforge.dev/process-node"
TAINT = {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
AGENT_VERSION = "lmforge-localnode"


def toleration() -> dict[str, str]:
    """What a pod adds to be allowed on the process node."""
    return {"key": TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}


def node_selector() -> dict[str, str]:
    return {LABEL_NODE_TYPE[0]: LABEL_NODE_TYPE[1]}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def capacity(cpus: int | None = None, memory_bytes: int | None = None, pods: int = 110) -> dict[str, str]:
    cpus = cpus or os.cpu_count() or 1
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory_bytes = 8 << 30
    return {
        "cpu": str(cpus),
        "memory": f"{memory_bytes // 1024}Ki",
        "pods": str(pods),
        "ephemeral-storage": "100Gi",
    }


def node_manifest(name: str = NODE_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LABEL_NODE_TYPE[0]: LABEL_NODE_TYPE[1],
            },
        },
        "spec": {"taints": [dict(TAINT)]},
    }


def node_status(
    kubelet_port: int,
    node_ip: str = "127.0.0.1",
    ready: bool = True,
    transition_time: str | None = None,
    cap: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Only an InternalIP address: the apiserver dials the first of Hostname, InternalDNS,
    InternalIP..., and our node name does not resolve."""
    stamp = now()
    since = transition_time or stamp
    cap = cap or capacity()

    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": since,
        }

    return {
        "conditions": [
            condition(
                "Ready",
                "True" if ready else "False",
                "KubeletReady" if ready else "KubeletNotReady",
                "lmforge local process node is posting ready status" if ready else "agent stopping",
            ),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        ],
        "addresses": [{"type": "InternalIP", "address": node_ip}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "capacity": dict(cap),
        "allocatable": dict(cap),
        "nodeInfo": {
            "architecture": "amd64",
            "bootID": "",
            "machineID": "",
            "systemUUID": "",
            "containerRuntimeVersion": f"{AGENT_VERSION}://processes",
            "kernelVersion": platform.release(),
            "kubeProxyVersion": AGENT_VERSION,
            "kubeletVersion": f"v0.0.0-{AGENT_VERSION}",
            "operatingSystem": "linux",
            "osImage": platform.platform(),
        },
        "phase": "Running",
    }


def lease_manifest(name: str, node_uid: str | None, renew_time: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": LEASE_NAMESPACE}
    if node_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew_time},
    }
