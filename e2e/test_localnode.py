"""The local process node (`lmforge node run`) on the local cluster: pods bound to it run as real
processes, their status, exit codes, logs (`kubectl logs` through the node's kubelet API) and
readiness are real; then a TrainJob trains a tiny Llama on 2 worker processes, and a SIGKILLed
worker leads to a gang restart that resumes from the last checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
NAMESPACE = f"e2e-localnode-{uuid.uuid4().hex[:6]}"
NODE = "lmforge-local"
PLACEMENT = {
    "nodeSelector": {"lmforge.dev/node-type": "process"},
    "tolerations": [
        {"key": "lmforge.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ],
}


@pytest.fixture(scope="module")
def node_dir(cluster, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("localnode")


@pytest.fixture(scope="module")
def node(cluster, node_dir: Path) -> Iterator[Path]:
    """The agent process for this module; the Node object is deleted afterwards."""
    from lmforge.devcluster import pipeline

    proc = pipeline.start_node(pipeline.Kube.of(cluster.info), node_dir, node_dir / "agent.log")
    cluster.kubectl("create", "namespace", NAMESPACE)
    try:
        yield node_dir
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        pipeline.stop(proc)
        cluster.kubectl("delete", "node", NODE, "--wait=false", check=False)


def pod(name: str, command: list[str], restart: str = "Never", **container) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            **PLACEMENT,
            "restartPolicy": restart,
            "containers": [{"name": "main", "image": "unused", "command": command, **container}],
        },
    }


def pod_status(cluster, name: str) -> dict:
    return cluster.kubectl_json("get", "pod", name, "-n", NAMESPACE).get("status") or {}


def test_pod_succeeds_with_logs_env_and_configmap(cluster, wait_for, node):
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": NAMESPACE},
            "data": {"greeting": "hello", "file.txt": "from-a-volume"},
        }
    )
    manifest = pod(
        "hello",
        ["sh", "-c", "echo $(GREETING) from $POD_NAME at $POD_IP; cat /etc/cfg/file.txt"],
        env=[
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"}],
    )
    manifest["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}}]
    cluster.apply(manifest)
    wait_for(
        lambda: pod_status(cluster, "hello").get("phase") == "Succeeded",
        timeout=60,
        message=lambda: json.dumps(pod_status(cluster, "hello")),
    )
    status = pod_status(cluster, "hello")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert status["podIP"].startswith("127.0.")
    logs = cluster.kubectl("logs", "hello", "-n", NAMESPACE).stdout  # through the node's kubelet API
    assert logs == f"hello from hello at {status['podIP']}\nfrom-a-volume"
    cli = subprocess.run(
        [
            PYTHON,
            "-P",
            "-m",
            "lmforge.devcluster.node",
            "--state-dir",
            str(node),
            "logs",
            "hello",
            "-n",
            NAMESPACE,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cli.stdout == logs


def test_failing_pod_reports_the_real_exit_code(cluster, wait_for, node):
    cluster.apply(pod("fails", ["sh", "-c", "echo about to fail; exit 7"]))
    wait_for(lambda: pod_status(cluster, "fails").get("phase") == "Failed", timeout=60)
    terminated = pod_status(cluster, "fails")["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (7, "Error")
    assert cluster.kubectl("logs", "fails", "-n", NAMESPACE).stdout == "about to fail\n"


def test_on_failure_restarts_count(cluster, wait_for, node):
    cluster.apply(
        pod("flaky", ["sh", "-c", "test -e marker && exit 0; touch marker; exit 1"], restart="OnFailure")
    )
    wait_for(lambda: pod_status(cluster, "flaky").get("phase") == "Succeeded", timeout=60)
    assert pod_status(cluster, "flaky")["containerStatuses"][0]["restartCount"] == 1


def test_deployment_with_readiness_probe_two_pods_same_port(cluster, wait_for, node):
    container = {
        "name": "web",
        "image": "unused",
        "ports": [{"name": "http", "containerPort": 8000}],
        "command": ["python", "-m", "http.server", "8000", "--bind", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    cluster.apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web", "namespace": NAMESPACE},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {**PLACEMENT, "containers": [container]},
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": NAMESPACE},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
            },
        ]
    )
    wait_for(
        lambda: (
            cluster.kubectl_json("get", "deploy", "web", "-n", NAMESPACE)["status"].get("readyReplicas") == 2
        ),
        timeout=90,
        message="the Deployment's pods never became Ready",
    )
    found = subprocess.run(
        [PYTHON, "-P", "-m", "lmforge.devcluster.node", "endpoints", "web", "-n", NAMESPACE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(found) == 2 and all(e.endswith(":8000") for e in found)
    import urllib.request

    for endpoint in found:
        with urllib.request.urlopen(f"http://{endpoint}/", timeout=5) as response:
            assert response.status == 200
    names = [
        p["metadata"]["name"]
        for p in cluster.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=web")["items"]
    ]
    cluster.kubectl("delete", "deploy", "web", "-n", NAMESPACE, "--wait=false")
    wait_for(
        lambda: not cluster.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=web")["items"],
        timeout=60,
        message=f"pods {names} were not removed after SIGTERM",
    )


# --- the training pipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator(cluster, wait_for, node, operator_process) -> Iterator[None]:
    """The operator, with the workers' ServiceAccount: rank 0 annotates its pod with progress."""
    from lmforge.devcluster import pipeline

    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    wait_for(
        lambda: cluster.kubectl("get", "trainjobs.lmforge.dev", "-n", NAMESPACE, check=False).returncode == 0,
        timeout=30,
        message="the TrainJob CRD was not served",
    )
    cluster.apply(pipeline.worker_rbac(NAMESPACE))
    with operator_process(
        namespace=NAMESPACE, env={"LMFORGE_WORKER_SERVICE_ACCOUNT": pipeline.WORKER_SERVICE_ACCOUNT}
    ):
        yield


def trainjob(tmp: Path, name: str, max_steps: int) -> dict:
    from lmforge.devcluster import pipeline

    pipeline.write_inputs(tmp)
    (job,) = pipeline.render("trainjob.yaml", tmp, NAMESPACE)
    job["metadata"]["name"] = name
    job["spec"]["hyperparameters"]["maxSteps"] = max_steps
    job["spec"]["output"]["dir"] = f"hostPath://{tmp / name}"
    return job


def job_status(cluster, name: str) -> dict:
    return cluster.kubectl_json("get", "trainjob", name, "-n", NAMESPACE).get("status") or {}


@pytest.mark.slow
def test_trainjob_trains_for_real(cluster, wait_for, node, operator, tmp_path):
    cluster.apply(trainjob(tmp_path, "tune", 30))
    wait_for(
        lambda: job_status(cluster, "tune").get("phase") == "Succeeded",
        timeout=600,
        message=lambda: json.dumps(job_status(cluster, "tune")) + (node / "agent.log").read_text()[-2000:],
    )
    progress = job_status(cluster, "tune")["progress"]
    assert (progress["step"], progress["totalSteps"]) == (30, 30)
    assert (tmp_path / "tune" / "model.safetensors").exists()
    assert "saved checkpoint" in cluster.kubectl("logs", "tune-0", "-n", NAMESPACE).stdout


@pytest.mark.slow
def test_killed_worker_gang_restarts_and_resumes_from_checkpoint(cluster, wait_for, node, operator, tmp_path):
    cluster.apply(trainjob(tmp_path, "crash", 120))
    checkpoints = tmp_path / "crash" / "checkpoints"
    wait_for(
        lambda: (
            any(checkpoints.glob("step-*"))
            and job_status(cluster, "crash").get("progress", {}).get("step", 0) >= 15
        ),
        timeout=600,
        message=lambda: json.dumps(job_status(cluster, "crash")),
    )
    killed = subprocess.run(
        [
            PYTHON,
            "-P",
            "-m",
            "lmforge.devcluster.node",
            "--state-dir",
            str(node),
            "kill",
            "crash-1",
            "-n",
            NAMESPACE,
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 0, killed.stderr
    wait_for(
        lambda: job_status(cluster, "crash").get("restarts") == 1,
        timeout=120,
        message=lambda: json.dumps(job_status(cluster, "crash")),
    )
    wait_for(
        lambda: job_status(cluster, "crash").get("phase") == "Succeeded",
        timeout=600,
        message=lambda: json.dumps(job_status(cluster, "crash")),
    )
    status = job_status(cluster, "crash")
    assert status["restarts"] == 1 and status["progress"]["step"] == 120
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "crash" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps.count(1) == 1, "the restarted gang trained from step 0 again"
    assert sorted(set(steps)) == list(
        range(1, 121)
    )  # rank 0 appends; a resume may repeat steps after the checkpoint
    logs = cluster.kubectl("logs", "crash-0", "-n", NAMESPACE).stdout  # the restarted gang's rank 0
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert resumed, logs[-2000:]
    assert 0 < int(resumed[0].rsplit("at step", 1)[1].split()[0]) <= 120
