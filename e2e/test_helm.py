"""The Helm chart on the local cluster: lint, template, schema errors at `helm install`, a real
install, and the least-privilege RBAC proven both ways:

- enough: the operator Deployment's pods are only simulated by kwok, so the same process
  (`lmforge` + the Deployment's own args and env) runs here, authenticated with a token of the
  chart's ServiceAccount, and reconciles TrainJobs and InferenceServices through restarts, TTL
  deletion, drift repair and PDB removal without a single 403;
- no more: `kubectl auth can-i --list` for that ServiceAccount is exactly the expected table
  (beyond what every authenticated user has), and a list of dangerous verbs is refused.

Cluster-wide and `watchNamespaces` installs run one after the other (class-scoped fixtures), so
two operators never reconcile the same object."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHART = str(ROOT / "charts" / "lmforge")
LMFORGE = str(Path(sys.executable).parent / "lmforge")
SUFFIX = uuid.uuid4().hex[:6]  # fresh names per session, even on a reused cluster
SYSTEM_NS = "lmforge-system"
FORBIDDEN = re.compile(r"\b403\b|[Ff]orbidden|Not enough permissions")
MODEL = "/models/llama"  # plain paths: kwok has no PVCs to bind

# `kubectl auth can-i --list` rows the chart adds (resource[.group][/subresource] -> verbs, and
# resource names where a rule is limited to them). Why each: charts/lmforge/README.md, "RBAC".
NAMESPACED_GRANTS = {
    "trainjobs.lmforge.dev": "delete get list patch watch",
    "trainjobs.lmforge.dev/status": "update",
    "inferenceservices.lmforge.dev": "create get list patch watch",
    "inferenceservices.lmforge.dev/status": "update",
    "quantizejobs.lmforge.dev": "get list patch watch",
    "quantizejobs.lmforge.dev/status": "update",
    "jobs.batch": "create list watch",
    "pods": "create delete deletecollection list watch",
    "services": "create delete patch",
    "configmaps": "create delete patch",
    "deployments.apps": "create list patch watch",
    "deployments.apps/scale": "patch",
    "poddisruptionbudgets.policy": "create delete patch",
    "events": "create",
}
DISCOVERY_GRANTS = {"customresourcedefinitions.apiextensions.k8s.io": "list watch"}
# Never granted, whatever the values: (verb, resource, extra kubectl args).
DANGEROUS = [
    ("get", "secrets", ["-A"]),
    ("list", "secrets", ["-A"]),
    ("watch", "secrets", ["-A"]),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", []),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", []),
    ("bind", "clusterroles.rbac.authorization.k8s.io", []),
    ("impersonate", "serviceaccounts", ["-A"]),
    ("create", "serviceaccounts", ["-A", "--subresource=token"]),
    ("create", "pods", ["-A", "--subresource=exec"]),
    ("get", "pods", ["-A", "--subresource=log"]),
    ("update", "deployments.apps", ["-A"]),
    ("delete", "deployments.apps", ["-A"]),
    ("delete", "namespaces", []),
    ("create", "namespaces", []),
    ("patch", "nodes", []),
    ("update", "trainjobs.lmforge.dev", ["-A"]),
    ("patch", "trainjobs.lmforge.dev", ["-A", "--subresource=status"]),
    ("delete", "inferenceservices.lmforge.dev", ["-A"]),
    ("get", "configmaps", ["-A"]),
]


def parse_can_i(text: str) -> dict[str, tuple[str, str]]:
    """`kubectl auth can-i --list` -> {resource: (resource names, verbs)} for resource rows;
    rows of one resource (a named and an unnamed rule) are kept apart by their names."""
    rows: dict[str, tuple[str, str]] = {}
    for line in text.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$", line)
        if match:
            resource, _urls, names, verbs = match.groups()
            key = f"{resource} [{names}]" if names else resource
            previous = rows.get(key, ("", ""))[1].split()
            rows[key] = (names, " ".join(sorted(set(previous) | set(verbs.split()))))
    return rows


def grants(table: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {resource: ("", " ".join(sorted(verbs.split()))) for resource, verbs in table.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorAs:
    """The operator process exactly as the chart's Deployment starts it (command, args, env),
    authenticated as the chart's ServiceAccount; its log in a file."""

    def __init__(self, cluster, namespace: str, deployment: str, log_path: Path) -> None:
        self.log_path = log_path
        obj = cluster.kubectl_json("get", "deployment", deployment, "-n", namespace)
        pod = obj["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = list(container["args"])
        args[args.index("--liveness-port") + 1] = str(_free_port())  # 8080 may be taken here
        self.command = [LMFORGE if container["command"] == ["lmforge"] else container["command"][0], *args]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        kubeconfig = log_path.parent / f"{pod['serviceAccountName']}.kubeconfig"
        kubeconfig.write_text(json.dumps(sa_kubeconfig(cluster, namespace, pod["serviceAccountName"])))
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "POD_NAME": f"{deployment}-local", "KUBECONFIG": str(kubeconfig)},
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def forbidden_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if FORBIDDEN.search(line)]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def sa_kubeconfig(cluster, namespace: str, service_account: str) -> dict[str, Any]:
    """A kubeconfig for the API server of `cluster` that authenticates with a token of the
    ServiceAccount (what the pod would mount), not the admin's client certificate."""
    token = cluster.kubectl(
        "create", "token", service_account, "-n", namespace, "--duration=2h"
    ).stdout.strip()
    admin = cluster.kubectl_json("config", "view", "--raw", "--minify", "--flatten")
    server = admin["clusters"][0]["cluster"]
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sa",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": server["server"],
                    "certificate-authority-data": server["certificate-authority-data"],
                },
            }
        ],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account}}],
    }


class Kube:
    """kubectl shortcuts for the workload objects of one test."""

    def __init__(self, cluster, wait_for: Callable[..., Any], operator: OperatorAs) -> None:
        self.cluster, self.wait_for, self.operator = cluster, wait_for, operator

    def apply(self, kind: str, namespace: str, name: str, **spec: Any) -> None:
        obj = {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def trainjob(self, namespace: str, name: str, **spec: Any) -> None:
        base = {
            "model": MODEL,
            "dataset": {"source": "/data/train.jsonl"},
            "output": {"dir": "/out/llama"},
            "failurePolicy": {"backoffSeconds": 1},
        }
        self.apply("TrainJob", namespace, name, **{**base, **spec})

    def get(self, namespace: str, kind: str, name: str, check: bool = True) -> dict[str, Any] | None:
        result = self.cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json", check=check)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def status(self, namespace: str, kind: str, name: str) -> dict[str, Any]:
        return (self.get(namespace, kind, name) or {}).get("status") or {}

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def reasons(self, namespace: str, kind: str, name: str) -> set[str]:
        items = self.cluster.kubectl_json(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind={kind}",
        )["items"]
        return {e["reason"] for e in items}

    def wait_status(
        self, namespace: str, kind: str, name: str, timeout: float = 90, **want: Any
    ) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            status = self.status(namespace, kind, name)
            return status if all(status.get(k) == v for k, v in want.items()) else None

        return self.wait_for(
            match,
            timeout=timeout,
            message=lambda: (
                f"{kind} {namespace}/{name} never had {want}: {self.status(namespace, kind, name)}\n"
                f"{self.operator.log()[-8000:]}"
            ),
        )

    def wait_gone(self, namespace: str, kind: str, name: str, timeout: float = 60) -> None:
        self.wait_for(
            lambda: self.get(namespace, kind, name, check=False) is None,
            timeout=timeout,
            message=lambda: f"{kind} {namespace}/{name} was never deleted\n{self.operator.log()[-8000:]}",
        )


def install(cluster, release: str, namespace: str, *values: str) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    cluster.helm(
        "install",
        release,
        CHART,
        "-n",
        namespace,
        "--create-namespace",
        *sets,
        "--wait",
        "--timeout",
        "120s",
        timeout=180,
    )


def uninstall(cluster, release: str, namespace: str) -> None:
    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "60s", check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def can_i_list(cluster, service_account: str, namespace: str) -> dict[str, tuple[str, str]]:
    return parse_can_i(
        cluster.kubectl("auth", "can-i", "--list", f"--as={service_account}", "-n", namespace).stdout
    )


@pytest.fixture(scope="module")
def baseline(cluster) -> Callable[[str], dict[str, tuple[str, str]]]:
    """What any ServiceAccount may do with no binding at all (self reviews, discovery)."""
    name = f"e2e-helm-nobody-{SUFFIX}"
    cluster.kubectl("create", "serviceaccount", name, "-n", "default")
    yield lambda namespace: can_i_list(cluster, f"system:serviceaccount:default:{name}", namespace)
    cluster.kubectl("delete", "serviceaccount", name, "-n", "default", check=False)


# --- no cluster state needed ---------------------------------------------------------------------------


def test_lint_and_template(cluster) -> None:
    out = cluster.helm("lint", "--strict", CHART).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out
    for values in (
        [],
        [
            "--set",
            "watchNamespaces={default,kube-public}",
            "--set",
            "dashboards.enabled=true",
            "--set",
            "workerServiceAccount.name=trainer",
        ],
    ):
        rendered = cluster.helm("template", "lmforge", CHART, "-n", "default", *values).stdout
        kinds = re.findall(r"^kind: (\w+)$", rendered, re.M)
        assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
        if values:  # a Role and RoleBinding per namespace for the operator and for the workers
            assert (kinds.count("Role"), kinds.count("RoleBinding"), kinds.count("ConfigMap")) == (4, 4, 1)
        # every object is valid for this API server, not just well-formed YAML
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=-1", "at '/replicaCount': minimum: got -1, want 1"),
        ("replicaCount=two", "at '/replicaCount': got string, want integer"),
        ("watchNamespaces=team-a", "at '/watchNamespaces': got string, want array"),
        ("peering.name=Not_Valid", "at '/peering/name'"),
    ],
    ids=["negative", "string", "not-a-list", "bad-name"],
)
def test_install_rejects_bad_values_with_a_clear_message(cluster, value: str, message: str) -> None:
    release = f"bad-{SUFFIX}"
    result = cluster.helm(
        "install", release, CHART, "-n", f"e2e-helm-bad-{SUFFIX}", "--set", value, check=False
    )
    assert result.returncode != 0
    assert (
        "values don't meet the specifications of the schema(s)" in result.stderr and message in result.stderr
    )
    assert cluster.helm("status", release, "-n", f"e2e-helm-bad-{SUFFIX}", check=False).returncode != 0


# --- cluster-wide install (the default values) -------------------------------------------------------


class ClusterWide:
    RELEASE = f"lmforge-e2e-{SUFFIX}"  # contains the chart name: objects are named after it
    SA = f"system:serviceaccount:{SYSTEM_NS}:lmforge-e2e-{SUFFIX}"
    PEERING = f"e2e-helm-{SUFFIX}"
    NS = f"e2e-helm-{SUFFIX}"


@pytest.fixture(scope="class")
def clusterwide_operator(cluster, tmp_path_factory) -> Iterator[OperatorAs]:
    c = ClusterWide
    install(cluster, c.RELEASE, SYSTEM_NS, f"peering.name={c.PEERING}")
    cluster.kubectl("create", "namespace", c.NS)
    op = OperatorAs(
        cluster, SYSTEM_NS, c.RELEASE, tmp_path_factory.mktemp("helm-clusterwide") / "operator.log"
    )
    yield op
    # the operator releases its finalizers; then it stops, then the release goes
    cluster.kubectl(
        "delete",
        "trainjobs,quantizejobs,inferenceservices",
        "--all",
        "-n",
        c.NS,
        "--timeout=60s",
        check=False,
    )
    op.stop()
    uninstall(cluster, c.RELEASE, SYSTEM_NS)
    cluster.kubectl("delete", "namespace", c.NS, "--wait=false", check=False)


class TestClusterWide(ClusterWide):
    @pytest.fixture
    def operator(self, clusterwide_operator) -> OperatorAs:
        return clusterwide_operator

    @pytest.fixture
    def kube(self, cluster, wait_for, operator) -> Kube:
        return Kube(cluster, wait_for, operator)

    def test_installed_deployment_runs_hardened(self, cluster, operator) -> None:
        deployment = cluster.kubectl_json("get", "deployment", self.RELEASE, "-n", SYSTEM_NS)
        assert deployment["status"].get("readyReplicas") == 2  # `helm install --wait` saw them ready (kwok)
        pods = cluster.kubectl_json(
            "get", "pods", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={self.RELEASE}"
        )
        for pod in pods["items"]:
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert operator.command[1:4] == ["operator", "run", "--peering"]

    def test_operator_as_its_service_account_reconciles_without_a_403(
        self, kube: Kube, cluster, wait_for, operator: OperatorAs
    ) -> None:
        ns = self.NS
        # TrainJob: gang created (pods, headless Service, ConfigMap), status written, Events posted
        kube.trainjob(ns, "gang", numNodes=2)
        kube.trainjob(ns, "ttl", numNodes=2, ttlSecondsAfterFinished=1)
        kube.apply("InferenceService", ns, "chat", model={"source": MODEL}, replicas=2)
        kube.apply(
            "QuantizeJob",
            ns,
            "quant",
            model=MODEL,
            method="w4a16-rtn",
            output="/out/llama-w4",
            serveAfter={"name": "quant-chat", "replicas": 1},
        )
        status = kube.wait_status(ns, "trainjob", "gang", phase="Running")
        assert status["observedGeneration"] == 1 and status["replicas"]["active"] == 2
        assert kube.get(ns, "service", "gang") and kube.get(ns, "configmap", "gang-config")
        assert {"GangCreated"} <= kube.reasons(ns, "TrainJob", "gang")
        # a worker dies: single-pod deletes and a new gang
        cluster.kubectl("annotate", "-n", ns, "pod", "gang-1", "lmforge.dev/fate=fail-137")
        kube.wait_status(ns, "trainjob", "gang", phase="Running", restarts=1)
        # success, then ttlSecondsAfterFinished: deletecollection of the pods, the job itself deleted
        kube.wait_status(ns, "trainjob", "ttl", phase="Running")
        cluster.kubectl("annotate", "-n", ns, "pod", "ttl-0", "lmforge.dev/fate=succeed")
        kube.wait_gone(ns, "trainjob", "ttl")
        wait_for(
            lambda: not kube.pods(ns, "lmforge.dev/job-name=ttl"),
            timeout=60,
            message="ttl pods outlived the job",
        )
        # deleting a running job: the cleanup handler removes its children
        cluster.kubectl("delete", "-n", ns, "trainjob", "gang", "--timeout=60s")
        wait_for(
            lambda: not kube.pods(ns, "lmforge.dev/job-name=gang"),
            timeout=60,
            message="gang pods left behind",
        )

        # InferenceService: Deployment + Service + PDB by server-side apply, status, Events
        status = kube.wait_status(ns, "inferenceservice", "chat", phase="Ready", readyReplicas=2)
        assert status["observedGeneration"] == 1
        assert kube.get(ns, "pdb", "chat") and kube.get(ns, "service", "chat")
        # drift repair through deployments/scale
        cluster.kubectl("scale", "-n", ns, "deployment/chat", "--replicas=1")
        wait_for(
            lambda: (
                "ReplicasRestored" in kube.reasons(ns, "InferenceService", "chat")
                and kube.get(ns, "deployment", "chat")["spec"]["replicas"] == 2
            ),
            timeout=60,
            message=operator.log,
        )
        # one replica: the PDB is deleted
        cluster.kubectl(
            "patch", "-n", ns, "lmisvc", "chat", "--type=merge", "-p", '{"spec": {"replicas": 1}}'
        )
        kube.wait_status(ns, "inferenceservice", "chat", observedGeneration=2, replicas=1)
        wait_for(lambda: kube.get(ns, "pdb", "chat", check=False) is None, timeout=60, message=operator.log)

        # QuantizeJob: a batch Job (kwok completes its pod), status, then serveAfter creates an
        # InferenceService by server-side apply, which the InferenceService controller serves
        status = kube.wait_status(
            ns, "quantizejob", "quant", phase="Succeeded", inferenceService="quant-chat"
        )
        assert status["observedGeneration"] == 1 and kube.get(ns, "job", "quant")
        kube.wait_status(ns, "inferenceservice", "quant-chat", observedGeneration=1)
        assert kube.get(ns, "deployment", "quant-chat")

        peering = cluster.kubectl_json("get", "clusterkopfpeering", self.PEERING)
        assert len(peering.get("status") or {}) == 1, "the operator does not hold its peering object"
        assert operator.proc.poll() is None, operator.log()
        assert operator.forbidden_lines() == [], "\n".join(operator.forbidden_lines())

    def test_grants_are_exactly_the_expected_set(self, cluster, operator, baseline) -> None:
        extra = {
            k: v for k, v in can_i_list(cluster, self.SA, self.NS).items() if baseline(self.NS).get(k) != v
        }
        expected = grants(
            {**NAMESPACED_GRANTS, **DISCOVERY_GRANTS, "clusterkopfpeerings.kopf.dev": "create list watch"}
        )
        expected[f"clusterkopfpeerings.kopf.dev [{self.PEERING}]"] = (self.PEERING, "get patch")
        assert extra == expected

    @pytest.mark.parametrize(
        ("verb", "resource", "args"), DANGEROUS, ids=[f"{v}-{r}{''.join(a[1:])}" for v, r, a in DANGEROUS]
    )
    def test_dangerous_verbs_are_refused(
        self, cluster, operator, verb: str, resource: str, args: list[str]
    ) -> None:
        result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={self.SA}", *args, check=False)
        assert result.stdout.strip() == "no", f"{self.SA} may {verb} {resource}"

    def test_peering_patch_is_limited_to_its_own_object(self, cluster, operator) -> None:
        def can(name: str) -> str:
            return cluster.kubectl(
                "auth",
                "can-i",
                "patch",
                f"clusterkopfpeerings.kopf.dev/{name}",
                f"--as={self.SA}",
                check=False,
            ).stdout.strip()

        assert (can(self.PEERING), can("someone-else")) == ("yes", "no")


# --- watchNamespaces ----------------------------------------------------------------------------------


class WatchNamespaces:
    RELEASE = f"lmforge-ns-{SUFFIX}"
    SYSTEM = f"e2e-helm-sys-{SUFFIX}"
    SA = f"system:serviceaccount:e2e-helm-sys-{SUFFIX}:lmforge-ns-{SUFFIX}"
    A, B = f"e2e-helm-a-{SUFFIX}", f"e2e-helm-b-{SUFFIX}"
    OTHER = f"e2e-helm-other-{SUFFIX}"
    PEERING = f"e2e-helm-ns-{SUFFIX}"


@pytest.fixture(scope="class")
def namespaced_operator(cluster, tmp_path_factory) -> Iterator[OperatorAs]:
    c = WatchNamespaces
    for namespace in (c.A, c.B, c.OTHER):
        cluster.kubectl("create", "namespace", namespace)
    install(
        cluster,
        c.RELEASE,
        c.SYSTEM,
        f"watchNamespaces={{{c.A},{c.B}}}",
        f"peering.name={c.PEERING}",
        "workerServiceAccount.name=lmforge-worker",
        "replicaCount=1",
    )
    op = OperatorAs(cluster, c.SYSTEM, c.RELEASE, tmp_path_factory.mktemp("helm-namespaced") / "operator.log")
    yield op
    for namespace in (c.A, c.B):
        cluster.kubectl(
            "delete",
            "trainjobs,quantizejobs,inferenceservices",
            "--all",
            "-n",
            namespace,
            "--timeout=60s",
            check=False,
        )
    op.stop()
    uninstall(cluster, c.RELEASE, c.SYSTEM)
    for namespace in (c.A, c.B, c.OTHER):
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


class TestWatchNamespaces(WatchNamespaces):
    @pytest.fixture
    def operator(self, namespaced_operator) -> OperatorAs:
        return namespaced_operator

    def test_operator_reconciles_its_namespaces_without_a_403(
        self, cluster, wait_for, operator: OperatorAs
    ) -> None:
        kube = Kube(cluster, wait_for, operator)
        assert operator.command[-4:] == ["-n", self.A, "-n", self.B]
        kube.trainjob(self.A, "solo", numNodes=1)
        kube.apply("InferenceService", self.B, "chat", model={"source": MODEL}, replicas=1)
        kube.apply("QuantizeJob", self.B, "quant", model=MODEL, method="fp8", output="/out/llama-fp8")
        status = kube.wait_status(self.A, "trainjob", "solo", phase="Running")
        assert status["observedGeneration"] == 1
        (pod,) = kube.pods(self.A, "lmforge.dev/job-name=solo")
        assert pod["spec"]["serviceAccountName"] == "lmforge-worker"  # the chart made it and its Role
        kube.wait_status(self.B, "inferenceservice", "chat", phase="Ready", observedGeneration=1)
        kube.wait_status(self.B, "quantizejob", "quant", phase="Succeeded", observedGeneration=1)
        for namespace in (self.A, self.B):
            peering = cluster.kubectl_json("get", "kopfpeering", self.PEERING, "-n", namespace)
            assert len(peering.get("status") or {}) == 1
        # outside its namespaces it sees nothing and touches nothing
        kube.trainjob(self.OTHER, "ignored", numNodes=1)
        cluster.kubectl("delete", "-n", self.A, "trainjob", "solo", "--timeout=60s")
        assert kube.status(self.OTHER, "trainjob", "ignored") == {}
        assert operator.proc.poll() is None, operator.log()
        assert operator.forbidden_lines() == [], "\n".join(operator.forbidden_lines())
        cluster.kubectl("delete", "-n", self.OTHER, "trainjob", "ignored", "--wait=false")

    def test_grants_per_namespace(self, cluster, operator, baseline) -> None:
        discovery = grants({**DISCOVERY_GRANTS, "namespaces": "list watch"})
        for namespace in (self.A, self.B):
            extra = {
                k: v
                for k, v in can_i_list(cluster, self.SA, namespace).items()
                if baseline(namespace).get(k) != v
            }
            expected = {
                **grants({**NAMESPACED_GRANTS, "kopfpeerings.kopf.dev": "create list watch"}),
                **discovery,
            }
            expected[f"kopfpeerings.kopf.dev [{self.PEERING}]"] = (self.PEERING, "get patch")
            assert extra == expected, namespace
        elsewhere = {
            k: v
            for k, v in can_i_list(cluster, self.SA, self.OTHER).items()
            if baseline(self.OTHER).get(k) != v
        }
        assert elsewhere == discovery

    @pytest.mark.parametrize(
        ("verb", "resource", "where"),
        [
            ("list", "pods", "-A"),
            ("create", "pods", "other"),
            ("list", "trainjobs.lmforge.dev", "-A"),
            ("patch", "clusterkopfpeerings.kopf.dev", ""),
            ("create", "clusterkopfpeerings.kopf.dev", ""),
            ("get", "secrets", "a"),
            ("list", "secrets", "-A"),
            ("patch", "deployments.apps", "other"),
        ],
    )
    def test_nothing_outside_the_watched_namespaces(
        self, cluster, operator, verb: str, resource: str, where: str
    ) -> None:
        args = {"-A": ["-A"], "": [], "other": ["-n", self.OTHER], "a": ["-n", self.A]}[where]
        result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={self.SA}", *args, check=False)
        assert result.stdout.strip() == "no"
