"""TrainJob end to end on the local cluster: the real operator process (`lmforge operator run`)
against a real API server, with kwok playing the kubelet (pod fates via lmforge.dev/fate)."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lmforge.devcluster.pipeline import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-trainjob-{uuid.uuid4().hex[:6]}"  # fresh per session, even on a reused cluster


def _install(cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trainjobs.lmforge.dev")
    cluster.kubectl("create", "namespace", namespace)


def _uninstall(cluster, namespace: str, op: OperatorProcess) -> None:
    """Delete the jobs while the operator still runs (it releases their finalizers), then the rest."""
    cluster.kubectl("delete", "trainjobs", "--all", "-n", namespace, "--timeout=60s", check=False)
    op.stop()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(cluster, operator_process) -> Iterator[OperatorProcess]:
    """`lmforge operator run --standalone` watching the module's namespace."""
    _install(cluster, NAMESPACE)
    op = operator_process(namespace=NAMESPACE)
    yield op
    _uninstall(cluster, NAMESPACE, op)


class Jobs:
    """kubectl shortcuts for one namespace."""

    def __init__(self, cluster, wait_for, namespace: str, operator: OperatorProcess) -> None:
        self.cluster, self.wait_for, self.ns, self.operator = cluster, wait_for, namespace, operator

    def apply(self, name: str, **spec: Any) -> None:
        # plain paths: pvc:// locations would be mounted, and kwok has no PVCs to bind
        base = {
            "model": "/models/llama",
            "dataset": {"source": "/data/train.jsonl"},
            "output": {"dir": "/out/llama"},
            "failurePolicy": {"backoffSeconds": 1},
        }
        obj = {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {**base, **spec},
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def get(self, name: str) -> dict[str, Any]:
        return self.cluster.kubectl_json("get", "-n", self.ns, "trainjob", name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def pods(self, name: str | None = None) -> list[dict[str, Any]]:
        selector = f"lmforge.dev/job-name={name}" if name else "lmforge.dev/job-name"
        return self.cluster.kubectl_json("get", "pods", "-n", self.ns, "-l", selector)["items"]

    def fate(self, pod: str, fate: str) -> None:
        self.cluster.kubectl("annotate", "--overwrite", "-n", self.ns, "pod", pod, f"lmforge.dev/fate={fate}")

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout=timeout,
            message=lambda: f"{name} never reached {phase}: {self.status(name)}\n{self.operator.tail()}",
        )

    def wait_running_pods(
        self, name: str, count: int, attempt: int = 0, timeout: float = 60
    ) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            pods = [p for p in self.pods(name) if not p["metadata"].get("deletionTimestamp")]
            ok = len(pods) == count and all(
                p["status"].get("phase") == "Running"
                and p["metadata"]["labels"]["lmforge.dev/restart"] == str(attempt)
                for p in pods
            )
            return pods if ok else None

        return self.wait_for(
            ready,
            timeout=timeout,
            message=lambda: (
                f"{name}: {count} running pods of attempt {attempt} never appeared: "
                f"{[(p['metadata']['name'], p['status'].get('phase')) for p in self.pods(name)]}"
                f"\n{self.operator.tail()}"
            ),
        )

    def delete(self, name: str) -> None:
        self.cluster.kubectl("delete", "-n", self.ns, "trainjob", name, "--wait=false", check=False)

    def events(self, name: str) -> list[str]:
        items = self.cluster.kubectl_json(
            "get",
            "events",
            "-n",
            self.ns,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind=TrainJob",
        )
        return [e["reason"] for e in sorted(items["items"], key=lambda e: e.get("lastTimestamp") or "")]


@pytest.fixture
def jobs(cluster, wait_for, operator) -> Jobs:
    return Jobs(cluster, wait_for, NAMESPACE, operator)


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from>") for e in pod["spec"]["containers"][0]["env"]}


def test_gang_runs_reports_progress_and_succeeds(jobs: Jobs, wait_for) -> None:
    jobs.apply("gang", numNodes=4, resourcesPerNode={"limits": {"nvidia.com/gpu": 1}})
    pods = sorted(jobs.wait_running_pods("gang", 4), key=lambda p: p["metadata"]["name"])
    job = jobs.get("gang")
    for rank, pod in enumerate(pods):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["name"] == f"gang-{rank}"
        assert (meta["labels"]["lmforge.dev/rank"], meta["labels"]["lmforge.dev/restart"]) == (str(rank), "0")
        assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == (
            f"gang-{rank}",
            "gang",
            "Never",
        )
        env = _env(pod)
        assert {
            k: env[k]
            for k in (
                "PET_NNODES",
                "PET_NPROC_PER_NODE",
                "PET_NODE_RANK",
                "PET_MASTER_ADDR",
                "PET_MASTER_PORT",
                "MASTER_ADDR",
                "WORLD_SIZE",
                "NODE_RANK",
            )
        } == {
            "PET_NNODES": "4",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "gang-0.gang",
            "PET_MASTER_PORT": "29500",
            "MASTER_ADDR": "gang-0.gang",
            "WORLD_SIZE": "4",
            "NODE_RANK": str(rank),
        }
    service = jobs.cluster.kubectl_json("get", "service", "-n", NAMESPACE, "gang")
    assert service["spec"]["clusterIP"] == "None"
    config = jobs.cluster.kubectl_json("get", "configmap", "-n", NAMESPACE, "gang-config")
    assert json.loads(config["data"]["train.json"])["numNodes"] == 4

    status = jobs.wait_phase("gang", "Running")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Created": "True", "Running": "True"}
    assert status["replicas"] == {"active": 4, "succeeded": 0, "failed": 0}

    report = {
        "step": 120,
        "totalSteps": 1000,
        "loss": 1.875,
        "tokensPerSecond": 5000.0,
        "etaSeconds": 125,
        "lastCheckpoint": "/ckpt/step-100",
    }
    jobs.cluster.kubectl(
        "annotate",
        "--overwrite",
        "-n",
        NAMESPACE,
        "pod",
        "gang-0",
        f"lmforge.dev/progress={json.dumps(report)}",
    )
    progress = wait_for(
        lambda: (
            jobs.status("gang").get("progress", {}).get("summary") == "120/1000"
            and jobs.status("gang")["progress"]
        ),
        timeout=30,
        message=jobs.operator.tail,
    )
    assert (progress["loss"], progress["eta"], progress["lastCheckpoint"]) == (
        1.875,
        "2m5s",
        "/ckpt/step-100",
    )
    table = jobs.cluster.kubectl("get", "lmtj", "-n", NAMESPACE, "gang").stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "NODES", "PROGRESS", "LOSS", "ETA", "RESTARTS", "AGE"]
    assert table[1].split()[:7] == ["gang", "Running", "4", "120/1000", "1.875", "2m5s", "0"]

    jobs.fate("gang-0", "succeed")
    status = jobs.wait_phase("gang", "Succeeded")
    assert status["completionTime"]
    wait_for(
        lambda: [p["metadata"]["name"] for p in jobs.pods("gang")] == ["gang-0"],
        timeout=60,
        message=lambda: f"other ranks not torn down: {[p['metadata']['name'] for p in jobs.pods('gang')]}",
    )
    assert {"GangCreated", "AllWorkersRunning", "AllWorkersSucceeded"} <= set(jobs.events("gang"))
    jobs.delete("gang")


def test_oom_killed_worker_restarts_the_gang(jobs: Jobs) -> None:
    jobs.apply("oom", numNodes=2)
    jobs.wait_running_pods("oom", 2)
    jobs.wait_phase("oom", "Running")
    jobs.fate("oom-1", "fail-137")
    jobs.wait_running_pods("oom", 2, attempt=1, timeout=90)
    status = jobs.wait_phase("oom", "Running")
    assert status["restarts"] == 1
    assert (status["lastFailure"]["pod"], status["lastFailure"]["exitCode"]) == ("oom-1", 137)
    assert "RetryableFailure" in jobs.events("oom")
    jobs.delete("oom")


def test_app_error_without_restarts_fails_the_job(jobs: Jobs, wait_for) -> None:
    jobs.apply("apperr", numNodes=3, failurePolicy={"maxRestarts": 0})
    jobs.wait_running_pods("apperr", 3)
    jobs.fate("apperr-2", "fail-1")
    status = jobs.wait_phase("apperr", "Failed")
    assert (status["lastFailure"]["pod"], status["lastFailure"]["exitCode"]) == ("apperr-2", 1)
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "NonRetryableExitCode")
    assert status["restarts"] == 0
    wait_for(
        lambda: [p["metadata"]["name"] for p in jobs.pods("apperr")] == ["apperr-2"],
        timeout=60,
        message="running ranks of a failed job were not deleted (the failed pod stays for logs)",
    )
    time.sleep(2)
    assert jobs.status("apperr")["phase"] == "Failed"  # terminal: never changes again
    jobs.delete("apperr")


def test_suspend_and_resume(jobs: Jobs, wait_for) -> None:
    jobs.apply("pause", numNodes=2)
    jobs.wait_running_pods("pause", 2)
    jobs.cluster.kubectl(
        "patch", "-n", NAMESPACE, "trainjob", "pause", "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    jobs.wait_phase("pause", "Suspended")
    wait_for(lambda: not jobs.pods("pause"), timeout=60, message="pods of a suspended job survived")
    jobs.cluster.kubectl(
        "patch", "-n", NAMESPACE, "trainjob", "pause", "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    jobs.wait_running_pods("pause", 2)
    status = jobs.wait_phase("pause", "Running")
    assert status["restarts"] == 0  # a resume is not a restart
    assert {"JobSuspended", "JobResumed"} <= set(jobs.events("pause"))
    jobs.delete("pause")


def test_deadline_fails_the_job(jobs: Jobs) -> None:
    jobs.apply("slow", numNodes=1, activeDeadlineSeconds=3)
    status = jobs.wait_phase("slow", "Failed", timeout=60)
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == "DeadlineExceeded"
    jobs.delete("slow")


def test_ttl_deletes_a_finished_job_and_its_pods(jobs: Jobs, wait_for) -> None:
    jobs.apply("ttl", numNodes=2, ttlSecondsAfterFinished=2)
    jobs.wait_running_pods("ttl", 2)
    jobs.fate("ttl-0", "succeed")
    wait_for(
        lambda: jobs.cluster.kubectl("get", "-n", NAMESPACE, "trainjob", "ttl", check=False).returncode != 0,
        timeout=60,
        message=lambda: f"job not deleted after its TTL\n{jobs.operator.tail()}",
    )
    wait_for(lambda: not jobs.pods("ttl"), timeout=60, message="pods outlived their job")


def _assert_one_current_gang_each(jobs: Jobs, names: list[str]) -> None:
    """Every pod belongs to one of `names`, each job has exactly ranks 0 and 1, owned by it and of
    its current attempt (no duplicates, no orphans, no stale gang)."""
    uids = {name: jobs.get(name)["metadata"]["uid"] for name in names}
    by_job: dict[str, list[dict[str, Any]]] = {}
    for pod in jobs.pods():
        by_job.setdefault(pod["metadata"]["labels"]["lmforge.dev/job-name"], []).append(pod)
    assert set(by_job) == set(names), "pods of unknown jobs (orphans)"
    for name, pods in by_job.items():
        restarts = jobs.status(name)["restarts"]
        ranks = sorted(int(p["metadata"]["labels"]["lmforge.dev/rank"]) for p in pods)
        assert ranks == [0, 1], f"{name}: ranks {ranks}"
        for pod in pods:
            assert pod["metadata"]["ownerReferences"][0]["uid"] == uids[name]
            assert pod["metadata"]["labels"]["lmforge.dev/restart"] == str(restarts), f"{name}: stale attempt"


@pytest.mark.slow
def test_sigkill_during_reconciles_leaves_no_duplicates_or_orphans(
    cluster, wait_for, operator_process
) -> None:
    """20 jobs, 10 SIGKILLs of the operator at random moments while it creates gangs and restarts
    failed ones; afterwards every job has exactly its ranks, of its current attempt, owned by it."""
    namespace = f"{NAMESPACE}-kill"
    _install(cluster, namespace)
    op = operator_process(namespace=namespace, name="kill")
    jobs = Jobs(cluster, wait_for, namespace, op)
    names = [f"kill-{i}" for i in range(20)]
    rng = random.Random(7)
    try:
        for name in names:
            jobs.apply(name, numNodes=2, failurePolicy={"maxRestarts": 100, "backoffSeconds": 1})
        for round_ in range(10):
            # once it is up (its handlers run right after the start-up line), kill it mid-reconcile
            wait_for(lambda: op.logs().count("lmforge operator") >= op.starts, timeout=60, message=op.tail)
            time.sleep(rng.uniform(0.1, 2.0))
            op.kill()
            if round_ < 8:  # fail a few running workers while it is down: the next operator must restart them
                running = [
                    p
                    for p in jobs.pods()
                    if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                ]
                for pod in rng.sample(running, k=min(3, len(running))):
                    jobs.fate(pod["metadata"]["name"], "fail-137")
            op.start()

        wait_for(
            lambda: all(jobs.status(name).get("phase") == "Running" for name in names),
            timeout=240,
            interval=2,
            message=lambda: (
                f"jobs never settled: {[(n, jobs.status(n).get('phase')) for n in names]}\n{op.tail()}"
            ),
        )
        _assert_one_current_gang_each(jobs, names)
        assert sum(jobs.status(n)["restarts"] for n in names) > 0, (
            "no restarts happened: the test proved little"
        )
    finally:
        if not op.running():
            op.start()
        _uninstall(cluster, namespace, op)
