"""Operator reliability under the faults of issue #16, on the local cluster: spec edits of a running
TrainJob (D1), a 120 s API-server outage (D2), namespace deletion (D3), takeover after kill -9 (D4),
`lmforge cluster up` after a component died and the supervisor (D5), a missing worker
ServiceAccount (D6). Each test failed on the main branch before the fix (see the issue).

Run one at a time (`pytest -q e2e/test_reliability.py -k outage`): the outage test alone takes ~3 min."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from lmforge.devcluster.cluster import cluster as localcluster
from lmforge.devcluster.cluster import processes

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = uuid.uuid4().hex[:6]  # fresh names per session, even on a reused cluster


@pytest.fixture(scope="module")
def crds(cluster) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    for crd in ("trainjobs", "inferenceservices"):
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}.lmforge.dev")


def namespace(cluster, prefix: str) -> str:
    name = f"e2e-{prefix}-{SUFFIX}"
    cluster.kubectl("create", "namespace", name)
    return name


def trainjob(cluster, ns: str, name: str, **spec: Any) -> None:
    base = {
        "model": "/models/llama",
        "dataset": {"source": "/data/train.jsonl"},
        "output": {"dir": "/out/llama"},
        "numNodes": 2,
        "failurePolicy": {"backoffSeconds": 1},
    }
    cluster.apply(
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": {**base, **spec},
        }
    )


def status(cluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    return cluster.kubectl_json("get", "-n", ns, kind, name).get("status") or {}


def pods(cluster, ns: str, job: str) -> list[dict[str, Any]]:
    return [
        p
        for p in cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"lmforge.dev/job-name={job}")["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]


def running_gang(cluster, ns: str, job: str, count: int) -> list[dict[str, Any]] | None:
    found = pods(cluster, ns, job)
    ok = len(found) == count and all(p.get("status", {}).get("phase") == "Running" for p in found)
    return found if ok else None


def events(cluster, ns: str, name: str, reason: str) -> int:
    items = cluster.kubectl_json(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name},reason={reason}"
    )["items"]
    return sum(int(e.get("count") or 1) for e in items)


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or () if c["type"] == type_), {})


def train_json(cluster, ns: str, job: str) -> dict[str, Any]:
    return json.loads(
        cluster.kubectl_json("get", "configmap", "-n", ns, f"{job}-config")["data"]["train.json"]
    )


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def state(cluster) -> dict[str, Any]:
    return json.loads((cluster.state_dir / "state.json").read_text())


def component(cluster, name: str) -> processes.Process:
    entry = next(p for p in state(cluster)["processes"] if p["name"] == name)
    return processes.Process.from_dict(entry)


def kill(process: processes.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.is_alive(process), 10)


def stop_supervisor(cluster) -> None:
    data = state(cluster).get("supervisor")
    assert data, "cluster up started no supervisor"
    kill(processes.Process.from_dict(data))


# --- D1: spec edits are refused while a gang runs, and reach the next gang --------------------------------


def test_spec_edits_are_refused_while_running_and_reach_the_next_gang(
    cluster, crds, operator_process, wait_for
):
    ns = namespace(cluster, "specedit")
    op = operator_process(namespace=ns)
    trainjob(cluster, ns, "edit")
    wait_for(lambda: running_gang(cluster, ns, "edit", 2), 90, message=op.tail)

    for patch, field in (
        ({"model": "/models/other"}, "spec.model"),
        ({"hyperparameters": {"maxSteps": 7}}, "spec.hyperparameters"),
    ):
        result = cluster.kubectl(
            "patch",
            "-n",
            ns,
            "trainjob",
            "edit",
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
            check=False,
        )
        assert result.returncode != 0, f"{patch} was accepted while the gang runs"
        assert field in result.stderr and "suspended" in result.stderr, result.stderr

    cluster.kubectl(
        "patch", "-n", ns, "trainjob", "edit", "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    wait_for(
        lambda: (
            status(cluster, ns, "trainjob", "edit").get("phase") == "Suspended"
            and not pods(cluster, ns, "edit")
        ),
        60,
        message=op.tail,
    )
    edit = {"numNodes": 3, "model": "/models/other", "hyperparameters": {"learningRate": 0.5, "maxSteps": 7}}
    cluster.kubectl("patch", "-n", ns, "trainjob", "edit", "--type=merge", "-p", json.dumps({"spec": edit}))
    cluster.kubectl(
        "patch", "-n", ns, "trainjob", "edit", "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    gang = wait_for(lambda: running_gang(cluster, ns, "edit", 3), 90, message=op.tail)

    config = train_json(cluster, ns, "edit")
    assert (config["model"], config["numNodes"]) == ("/models/other", 3)
    assert (config["hyperparameters"]["learningRate"], config["hyperparameters"]["maxSteps"]) == (0.5, 7)
    assert {env_of(p)["PET_NNODES"] for p in gang} == {"3"}  # env and train.json agree
    job = cluster.kubectl_json("get", "-n", ns, "trainjob", "edit")
    wait_for(
        lambda: (
            status(cluster, ns, "trainjob", "edit").get("observedGeneration") == job["metadata"]["generation"]
        ),
        30,
        message=op.tail,
    )
    cluster.kubectl("delete", "trainjobs", "--all", "-n", ns, "--timeout=60s")


# --- D6: a missing worker ServiceAccount is named, once, and no pods are claimed ----------------------------


def test_missing_service_account_is_named_once_and_nothing_is_claimed(
    cluster, crds, operator_process, wait_for
):
    ns = namespace(cluster, "nosa")
    op = operator_process(namespace=ns, env={"LMFORGE_WORKER_SERVICE_ACCOUNT": "trainer"}, name="nosa")
    trainjob(cluster, ns, "nosa")

    def refused() -> dict[str, Any] | None:
        created = condition(status(cluster, ns, "trainjob", "nosa"), "Created")
        return created if created.get("reason") == "ServiceAccountMissing" else None

    created = wait_for(refused, 60, message=op.tail)
    assert created["status"] == "False" and "'trainer'" in created["message"], created
    time.sleep(12)  # two more retries (every 5 s)
    assert pods(cluster, ns, "nosa") == []
    assert condition(status(cluster, ns, "trainjob", "nosa"), "Created")["status"] == "False"
    assert events(cluster, ns, "nosa", "ServiceAccountMissing") == 1
    assert events(cluster, ns, "nosa", "GangCreated") == 0
    assert events(cluster, ns, "nosa", "ReconcileError") == 0

    cluster.kubectl("create", "serviceaccount", "trainer", "-n", ns)  # fixed: the gang comes, Created=True
    wait_for(
        lambda: (
            len(pods(cluster, ns, "nosa")) == 2
            and condition(status(cluster, ns, "trainjob", "nosa"), "Created").get("status") == "True"
        ),
        60,
        message=op.tail,
    )
    assert events(cluster, ns, "nosa", "GangCreated") == 1
    cluster.kubectl("delete", "trainjobs", "--all", "-n", ns, "--timeout=60s")


# --- D3: deleting a namespace never deadlocks, and never stops the other namespaces --------------------------


def test_namespace_deletion_completes_and_other_namespaces_keep_working(
    cluster, crds, operator_process, wait_for
):
    doomed, healthy = namespace(cluster, "doomed"), namespace(cluster, "healthy")
    op = operator_process("-n", healthy, namespace=doomed, standalone=False, name="namespaces", liveness=True)
    op.wait_healthy()
    trainjob(cluster, doomed, "tj")
    cluster.apply(
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "svc", "namespace": doomed},
            "spec": {"model": {"source": "/models/llama"}},
        }
    )
    trainjob(cluster, healthy, "before")
    wait_for(
        lambda: running_gang(cluster, doomed, "tj", 2) and running_gang(cluster, healthy, "before", 2),
        90,
        message=op.tail,
    )
    wait_for(
        lambda: cluster.kubectl("get", "deployment", "svc", "-n", doomed, check=False).returncode == 0,
        60,
        message=op.tail,
    )

    started = time.monotonic()
    cluster.kubectl("delete", "namespace", doomed, "--wait=false")
    wait_for(
        lambda: cluster.kubectl("get", "namespace", doomed, check=False).returncode != 0,
        30,
        message=lambda: (
            cluster.kubectl("get", "namespace", doomed, "-o", "yaml", check=False).stdout + op.tail()
        ),
    )
    print(f"namespace {doomed} gone after {time.monotonic() - started:.1f} s")
    trainjob(cluster, healthy, "after")
    wait_for(lambda: running_gang(cluster, healthy, "after", 2), 60, message=op.tail)

    op.stop()  # a restart with the watched namespace gone: logged and retried, the other one works
    op.start()
    op.wait_healthy()
    trainjob(cluster, healthy, "restarted")
    wait_for(lambda: running_gang(cluster, healthy, "restarted", 2), 90, message=op.tail)
    assert op.running(), op.tail()
    cluster.kubectl("delete", "trainjobs", "--all", "-n", healthy, "--timeout=60s")
    assert op.stop() == 0


# --- D4: takeover after kill -9 ----------------------------------------------------------------------------


def test_takeover_after_kill_9_takes_seconds(cluster, crds, operator_process, wait_for):
    """A restarted replica (no POD_NAME: a new identity, as for a replacement pod) must not wait
    for the dead one's peering record. Measured: kill -9 -> a TrainJob applied right after has
    its gang, 5 times; the median is reported, and every one must stay under 20 s."""
    ns = namespace(cluster, "takeover")
    op = operator_process(namespace=ns, standalone=False, name="takeover", liveness=True)
    op.wait_healthy()
    trainjob(cluster, ns, "warm", numNodes=1)
    wait_for(lambda: running_gang(cluster, ns, "warm", 1), 90, message=op.tail)
    takeovers = []
    for run in range(5):
        op.kill()
        killed = time.monotonic()
        op.start()
        trainjob(cluster, ns, f"after-{run}", numNodes=1)
        wait_for(
            lambda run=run: running_gang(cluster, ns, f"after-{run}", 1), 90, interval=0.2, message=op.tail
        )
        takeovers.append(time.monotonic() - killed)
    median = statistics.median(takeovers)
    print(f"takeover after kill -9: {', '.join(f'{t:.1f}' for t in takeovers)} s; median {median:.1f} s")
    # every restart, not the median: with random priorities about half the restarts waited ~60 s
    assert max(takeovers) < 20, takeovers
    assert "waiting for peer" not in op.logs(), op.tail()
    cluster.kubectl("delete", "trainjobs", "--all", "-n", ns, "--timeout=60s")


# --- D5: cluster up keeps the data; the supervisor restarts a component ------------------------------------


def test_cluster_up_after_a_component_died_keeps_every_object(cluster, crds, wait_for):
    ns = namespace(cluster, "keep")
    cluster.kubectl("create", "configmap", "precious", "-n", ns, "--from-literal=k=v")
    stop_supervisor(cluster)  # so that `up` finds the component dead
    kill(component(cluster, "kube-scheduler"))
    lines: list[str] = []
    localcluster.up(cluster.state_dir, log=lines.append)
    assert any("restarting kube-scheduler" in line and "kept" in line for line in lines), lines
    assert cluster.kubectl_json("get", "configmap", "precious", "-n", ns)["data"] == {"k": "v"}
    assert cluster.kubectl("get", "crd", "trainjobs.lmforge.dev", check=False).returncode == 0
    assert processes.is_alive(component(cluster, "kube-scheduler"))


def test_supervisor_restarts_a_component_that_exits(cluster, wait_for):
    before = component(cluster, "kube-scheduler")
    kill(before)
    after = wait_for(
        lambda: (p := component(cluster, "kube-scheduler")).pid != before.pid and processes.is_alive(p) and p,
        30,
        message="the scheduler was not restarted",
    )
    log = (cluster.state_dir / "logs" / "supervisor.log").read_text()
    assert f"kube-scheduler (pid {before.pid}) exited: restarting it" in log
    assert f"restarted as pid {after.pid}" in log
    ns = namespace(cluster, "sched")  # and it schedules again
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": ns},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]},
        }
    )
    wait_for(
        lambda: cluster.kubectl_json("get", "pod", "p", "-n", ns)["spec"].get("nodeName"),
        60,
        message="the pod was never scheduled",
    )


# --- D2: an API-server outage of 120 s -----------------------------------------------------------------------


def test_operator_recovers_from_a_120_s_api_server_outage(cluster, crds, operator_process, wait_for):
    """Peering on (the keep-alive is what died). The API server and the supervisor are killed, the
    outage lasts 120 s, `cluster up` brings the API server back (data kept); then within 60 s a new
    TrainJob gets its gang: from the same process, or from one the test restarts after it exited
    non-zero (the test acts as the kubelet). SIGTERM then exits within 10 s."""
    ns = namespace(cluster, "outage")
    op = operator_process(namespace=ns, standalone=False, name="outage", liveness=True)
    op.wait_healthy()
    trainjob(cluster, ns, "before", numNodes=1)
    wait_for(lambda: running_gang(cluster, ns, "before", 1), 90, message=op.tail)

    stop_supervisor(cluster)
    kill(component(cluster, "kube-apiserver"))
    deadline = time.monotonic() + 120
    restarts = 0
    while time.monotonic() < deadline:  # the kubelet's part: restart an operator that exited
        if not op.running():
            assert op.proc.returncode != 0, "the operator exited 0 during the outage"
            restarts += 1
            op.start()
        time.sleep(1)
    localcluster.up(cluster.state_dir, log=lambda _: None)
    back = time.monotonic()
    trainjob(cluster, ns, "after", numNodes=1)

    def reconciled() -> bool:
        nonlocal restarts
        if not op.running():
            assert op.proc.returncode != 0, "the operator exited 0 after the outage"
            restarts += 1
            op.start()
        return bool(running_gang(cluster, ns, "after", 1))

    wait_for(reconciled, 60, interval=1, message=op.tail)
    print(
        f"reconciled {time.monotonic() - back:.1f} s after the API server returned; operator restarts: {restarts}"
    )
    stopping = time.monotonic()
    code = op.stop(timeout=15)
    assert time.monotonic() - stopping < 10, op.tail()
    assert code == 0, op.tail()
    cluster.kubectl("delete", "trainjobs", "--all", "-n", ns, "--timeout=60s", check=False)


def test_operator_whose_retries_run_out_exits_1_and_is_restarted(cluster, crds, operator_process, wait_for):
    """The other half of D2: past --api-retry-seconds the peering keep-alive dies (what froze the
    operator before); now /healthz fails and the process exits 1 within seconds, instead of
    hanging; restarted (the test is the kubelet), it reconciles once the API server is back."""
    ns = namespace(cluster, "retries")
    op = operator_process(
        "--api-retry-seconds", "10", namespace=ns, standalone=False, name="retries", liveness=True
    )
    op.wait_healthy()
    stop_supervisor(cluster)
    kill(component(cluster, "kube-apiserver"))
    killed = time.monotonic()
    # kopf touches its peering record every ~50 s, then retries 10 s (and 10 s more to withdraw)
    unhealthy = wait_for(lambda: not op.healthy() and time.monotonic(), 120, interval=0.5, message=op.tail)
    wait_for(lambda: not op.running(), 30, interval=0.5, message=op.tail)
    exited = time.monotonic()
    assert op.proc.returncode == 1, op.tail()
    assert "reconcilers are dead" in op.logs(), op.tail()
    print(
        f"/healthz failed {unhealthy - killed:.1f} s and the process exited 1 {exited - killed:.1f} s "
        "after the API server went down"
    )
    localcluster.up(cluster.state_dir, log=lambda _: None)
    op.start()
    trainjob(cluster, ns, "after", numNodes=1)
    wait_for(lambda: running_gang(cluster, ns, "after", 1), 60, message=op.tail)
    assert op.stop() == 0
    cluster.kubectl("delete", "trainjobs", "--all", "-n", ns, "--timeout=60s", check=False)


def test_cluster_reset_needs_a_confirmation(cluster):
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lmforge"),
            "cluster",
            "reset",
            "--state-dir",
            str(cluster.state_dir),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "nothing deleted" in result.stderr
    assert (cluster.state_dir / "etcd-data").exists()
    assert cluster.kubectl("get", "namespaces", check=False).returncode == 0
