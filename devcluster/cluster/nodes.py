"""The simulated GPU nodes. kwok manages every Node carrying the `kwok.x-k8s.io/node: fake`
annotation; its node-initialize stage keeps the capacity written here and marks them Ready."""

from __future__ import annotations

from dataclasses import dataclass

KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodeShape:
    """One 8-GPU server (an H100 SXM box, roughly)."""

    gpus: int = 8
    cpu: str = "96"
    memory: str = "1024Gi"
    pods: str = "110"
    ephemeral_storage: str = "2Ti"
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"


def node_name(index: int) -> str:
    return f"kwok-node-{index}"


def node_manifest(index: int, shape: NodeShape = NodeShape()) -> dict:
    """No taint: there are no real nodes, so every pod may land on a kwok node."""
    name = node_name(index)
    resources = {
        "cpu": shape.cpu,
        "memory": shape.memory,
        "pods": shape.pods,
        "ephemeral-storage": shape.ephemeral_storage,
        GPU_RESOURCE: str(shape.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": shape.gpu_product,
                "nvidia.com/gpu.count": str(shape.gpus),
            },
        },
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def node_list(count: int, shape: NodeShape = NodeShape()) -> dict:
    """A v1 List, ready for `kubectl apply -f -`."""
    return {"apiVersion": "v1", "kind": "List", "items": [node_manifest(i, shape) for i in range(count)]}


def is_ready(node: dict) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


LIFECYCLE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def is_schedulable(node: dict) -> bool:
    """Ready, and the node lifecycle controller has lifted its not-ready taint (until then the
    scheduler skips the node even though it reports Ready)."""
    taints = node.get("spec", {}).get("taints") or []
    return is_ready(node) and not any(t.get("key") in LIFECYCLE_TAINTS for t in taints)
