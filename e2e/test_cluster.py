"""The local control plane itself: real apiserver/scheduler/controllers, kwok GPU nodes, and the
pod fates that other e2e tests use to drive failure paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.devcluster.cluster import processes

pytestmark = pytest.mark.e2e

NS = "e2e-localcluster"
IMAGE = "registry.invalid/lmforge/fake:1"  # never pulled: kwok runs no containers


@pytest.fixture(scope="module")
def ns(cluster):
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    yield NS
    cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def pod(name: str, annotations: dict | None = None, finalizers: list | None = None, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "annotations": annotations or {},
            "finalizers": finalizers or [],
        },
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": IMAGE}], **spec},
    }


def get_pod(cluster, name: str) -> dict:
    return cluster.kubectl_json("get", "pod", name, "-n", NS)


def phase(cluster, name: str) -> str | None:
    return get_pod(cluster, name).get("status", {}).get("phase")


def is_ready(obj: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


def test_four_ready_nodes_with_eight_gpus(cluster):
    items = cluster.kubectl_json("get", "nodes")["items"]
    assert len(items) == 4
    for node in items:
        assert is_ready(node), node["metadata"]["name"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"


def test_versions_are_the_real_ones(cluster):
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    for side in ("clientVersion", "serverVersion"):
        assert versions[side]["gitVersion"].startswith("v1.36."), versions
        assert (versions[side]["major"], versions[side]["minor"]) == ("1", "36")
    assert cluster.helm("version", "--short").stdout.startswith("v3.")


def test_deployment_pods_run_on_kwok_nodes(cluster, ns, wait_for):
    labels = {"app": "gpu-deploy"}
    container = {"name": "main", "image": IMAGE, "resources": {"limits": {"nvidia.com/gpu": "8"}}}
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpu-deploy", "namespace": ns},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        }
    )
    wait_for(
        lambda: (
            cluster.kubectl_json("get", "deployment", "gpu-deploy", "-n", ns)
            .get("status", {})
            .get("readyReplicas")
            == 2
        ),
        timeout=60,
        message="deployment never had 2 ready replicas",
    )
    pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app=gpu-deploy")["items"]
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Running" and is_ready(p) and p["status"].get("podIP") for p in pods)
    # 8 GPUs each: the scheduler must have put them on two different kwok nodes
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    assert all(p["spec"]["nodeName"].startswith("kwok-node-") for p in pods)


def test_fate_fail_sets_the_exit_code(cluster, ns, wait_for):
    cluster.apply(pod("fail-3", {"lmforge.dev/fate": "fail-3"}))
    wait_for(lambda: phase(cluster, "fail-3") == "Failed", timeout=60, message="pod never Failed")
    terminated = get_pod(cluster, "fail-3")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"


def test_fate_succeed(cluster, ns, wait_for):
    cluster.apply(pod("succeed", {"lmforge.dev/fate": "succeed"}))
    wait_for(lambda: phase(cluster, "succeed") == "Succeeded", timeout=60, message="pod never Succeeded")
    terminated = get_pod(cluster, "succeed")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")


def test_fate_set_on_a_running_pod(cluster, ns, wait_for):
    cluster.apply(pod("late-fate"))
    wait_for(lambda: phase(cluster, "late-fate") == "Running", timeout=60, message="pod never Running")
    cluster.kubectl("annotate", "pod", "late-fate", "-n", ns, "lmforge.dev/fate=fail-137")
    wait_for(
        lambda: phase(cluster, "late-fate") == "Failed", timeout=60, message="annotated pod never Failed"
    )
    status = get_pod(cluster, "late-fate")["status"]
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert not is_ready(get_pod(cluster, "late-fate"))


def test_readiness_follows_the_annotation(cluster, ns, wait_for):
    cluster.apply(pod("unready", {"lmforge.dev/ready": "false"}))
    wait_for(lambda: phase(cluster, "unready") == "Running", timeout=60, message="pod never Running")
    assert not is_ready(get_pod(cluster, "unready"))
    cluster.kubectl("annotate", "pod", "unready", "-n", ns, "lmforge.dev/ready=true", "--overwrite")
    wait_for(lambda: is_ready(get_pod(cluster, "unready")), timeout=60, message="pod never became Ready")
    cluster.kubectl("annotate", "pod", "unready", "-n", ns, "lmforge.dev/ready=false", "--overwrite")
    wait_for(
        lambda: not is_ready(get_pod(cluster, "unready")), timeout=60, message="pod never became unready"
    )


def test_job_pods_complete(cluster, ns, wait_for):
    cluster.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "job", "namespace": ns},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": IMAGE}]}
                },
            },
        }
    )
    wait_for(
        lambda: cluster.kubectl_json("get", "job", "job", "-n", ns).get("status", {}).get("succeeded") == 1,
        timeout=90,
        message="job never succeeded",
    )


def test_deleting_a_pod_removes_it_once_finalizers_are_gone(cluster, ns, wait_for):
    def gone(name: str) -> bool:
        return cluster.kubectl("get", "pod", name, "-n", ns, "--ignore-not-found", "-o", "name").stdout == ""

    cluster.apply(pod("doomed"))
    cluster.apply(pod("held", finalizers=["lmforge.dev/e2e-hold"]))
    for name in ("doomed", "held"):
        wait_for(lambda n=name: phase(cluster, n) == "Running", timeout=60, message=f"{name} never Running")
    cluster.kubectl("delete", "pod", "doomed", "held", "-n", ns, "--wait=false")
    wait_for(lambda: gone("doomed"), timeout=60, message="deleted pod still there")
    assert get_pod(cluster, "held")["metadata"].get("deletionTimestamp")
    cluster.kubectl(
        "patch",
        "pod",
        "held",
        "-n",
        ns,
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/metadata/finalizers"}]',
    )
    wait_for(lambda: gone("held"), timeout=60, message="pod still there after its finalizer was removed")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "lmforge.cli", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_second_cluster_up_is_idempotent_and_down_leaves_nothing(cluster, tmp_path):
    """A second cluster beside the session's (they must not collide), driven through the CLI."""
    state_dir = str(tmp_path / "second")
    first = _cli("up", "--state-dir", state_dir, "--nodes", "1")
    assert first.returncode == 0, first.stderr
    assert f"export KUBECONFIG={tmp_path / 'second' / 'kubeconfig'}" in first.stdout
    try:
        again = _cli("up", "--state-dir", state_dir, "--nodes", "1")
        assert again.returncode == 0 and "already up" in again.stderr
        state = json.loads((tmp_path / "second" / "state.json").read_text())
        assert _cli("status", "--state-dir", state_dir).returncode == 0
        session_ports = {
            p
            for p in json.loads((cluster.state_dir / "state.json").read_text())["processes"]
            for p in p["ports"]
        }
        assert not session_ports & {port for p in state["processes"] for port in p["ports"]}
    finally:
        down = _cli("down", "--state-dir", state_dir)
    assert down.returncode == 0, down.stderr
    recorded = [processes.Process.from_dict(p) for p in state["processes"]]
    assert len(recorded) == 5
    assert not [p.name for p in recorded if Path(f"/proc/{p.pid}").exists() and processes.is_alive(p)]
    assert not {port for p in recorded for port in p.ports} & processes.listening_ports()
    assert _cli("status", "--state-dir", state_dir).returncode == 1
    # the session's cluster is untouched
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"
