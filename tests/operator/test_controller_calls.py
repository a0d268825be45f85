"""What the controllers send through operator/kube.py, against the in-memory API server of
tests/operator/conftest.py: the calls (and so the RBAC rows they need), and the 404/409 paths
that make every step safe to repeat. Paths that post kopf Events run in the e2e suites."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.configuration import Configuration

from lmforge.devcluster.factories import T0, created_ranks, spec_dict
from lmforge.operator import main
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders import inferenceservice as isvc_build
from lmforge.operator.builders import trainjob as tj_build
from lmforge.operator.builders.inferenceservice_status import DeploymentView
from lmforge.operator.builders.trainjob_policy import Observed, decide, delete_children
from lmforge.operator.controllers import inferenceservice, reconcile, trainjob
from lmforge.operator.decision import Delete
from lmforge.operator.kube import ApiError, KubeApi

NS = "team-a"
LOG = logging.getLogger("test")
CORE = f"/api/v1/namespaces/{NS}"
APPS = f"/apis/apps/v1/namespaces/{NS}"
POLICY = f"/apis/policy/v1/namespaces/{NS}"
LMFORGE = f"/apis/lmforge.dev/v1alpha1/namespaces/{NS}"


def api_for(server) -> KubeApi:
    return KubeApi(Configuration(host=server.url))


def trainjob_body(num_nodes: int = 2, resource_version: str = "1") -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": "llama",
            "namespace": NS,
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": resource_version,
        },
        "spec": spec_dict(numNodes=num_nodes),
    }


# --- TrainJob -------------------------------------------------------------------------------------


def tj_decision(job: dict[str, Any], generation: int = 1, **kwargs: Any):
    spec = TrainJobSpec.model_validate(job["spec"])
    return decide(
        Observed(
            name="llama",
            generation=generation,
            spec=spec,
            status=TrainJobStatus(),
            pods=(),
            now=T0,
            namespace=NS,
            uid="uid-1",
            **kwargs,
        )
    )


def execute(server, actions) -> None:
    async def go() -> None:
        api = api_for(server)
        try:
            await reconcile.execute(api, tuple(actions))
        finally:
            await api.close()

    asyncio.run(go())


def test_trainjob_creates_the_gang_once(apiserver) -> None:
    decision = tj_decision(trainjob_body())
    assert created_ranks(decision) == (0, 1)
    execute(apiserver, decision.actions)
    execute(apiserver, decision.actions)  # a restarted operator
    assert sorted(apiserver.objects) == [
        f"{CORE}/configmaps/{tj_build.config_map_name('llama')}",
        f"{CORE}/pods/llama-0",
        f"{CORE}/pods/llama-1",
        f"{CORE}/services/llama",
    ]
    assert set(apiserver.calls()) == {
        ("POST", f"{CORE}/pods"),
        ("PATCH", f"{CORE}/services/llama"),
        ("PATCH", f"{CORE}/configmaps/llama-config"),
    }
    assert len(apiserver.requests) == 8  # 2 applies + 2 pod creates, then the same with 2 x 409 AlreadyExists


def test_trainjob_gang_start_rewrites_an_outdated_config_map(apiserver) -> None:
    """D1: a ConfigMap left by an older spec (or a person) is brought to this spec before the pods."""
    path = f"{CORE}/configmaps/llama-config"
    apiserver.put(
        path,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "llama-config", "namespace": NS},
            "data": {"train.json": '{"model": "/models/old"}'},
        },
    )
    job = trainjob_body()
    job["spec"]["model"] = "/models/new"
    execute(apiserver, tj_decision(job, generation=2).actions)
    assert json.loads(apiserver.objects[path]["data"]["train.json"])["model"] == "/models/new"
    assert apiserver.calls()[0] in {("PATCH", path), ("PATCH", f"{CORE}/services/llama")}  # before any pod


def test_trainjob_refused_pod_is_reported_not_raised_as_an_api_error(apiserver) -> None:
    """D6: a 403 on pod creation (missing ServiceAccount) is a Refusal naming the pod."""
    apiserver.fail[("POST", f"{CORE}/pods")] = (
        403,
        "Forbidden",
        'pods "llama-0" is forbidden: error looking up '
        'service account team-a/trainer: serviceaccount "trainer" not found',
    )
    decision = tj_decision(trainjob_body(), cfg=tj_build.BuildConfig(service_account="trainer"))
    with pytest.raises(reconcile.Refused) as refused:
        execute(apiserver, decision.actions)
    assert refused.value.refusal.name == "llama-0" and refused.value.refusal.error.status == 403
    assert "serviceaccount" in refused.value.refusal.error.message


def test_trainjob_deletes_pods_gracefully_or_at_once(apiserver) -> None:
    for name in ("llama-0", "llama-1"):
        apiserver.put(f"{CORE}/pods/{name}", {"metadata": {"name": name, "namespace": NS}})
    execute(
        apiserver,
        [
            Delete("v1", "Pod", NS, "llama-1", grace_period_seconds=0),
            Delete("v1", "Pod", NS, "llama-0"),
            Delete("v1", "Pod", NS, "gone"),
        ],
    )
    assert not apiserver.objects
    queries = {r.path.rsplit("/", 1)[1]: r.query for r in apiserver.requests}
    assert queries == {"llama-1": {"gracePeriodSeconds": "0"}, "llama-0": {}, "gone": {}}


def test_trainjob_delete_children_and_job(apiserver) -> None:
    labels = {"lmforge.dev/job-name": "llama", "lmforge.dev/kind": "TrainJob"}
    apiserver.put(f"{CORE}/pods/llama-0", {"metadata": {"name": "llama-0", "labels": labels}})
    apiserver.put(
        f"{CORE}/pods/other-0",
        {"metadata": {"name": "other-0", "labels": {**labels, "lmforge.dev/job-name": "other"}}},
    )
    apiserver.put(f"{CORE}/services/llama", {"metadata": {"name": "llama"}})
    apiserver.put(f"{LMFORGE}/trainjobs/llama", trainjob_body())
    execute(
        apiserver, [*delete_children(NS, "llama"), Delete("lmforge.dev/v1alpha1", "TrainJob", NS, "llama")]
    )
    execute(apiserver, delete_children(NS, "llama"))  # kopf's delete handler after it: all gone already
    assert list(apiserver.objects) == [f"{CORE}/pods/other-0"]
    collection = next(r for r in apiserver.requests if r.path == f"{CORE}/pods")
    assert (collection.method, collection.query) == (
        "DELETE",
        {"labelSelector": "lmforge.dev/job-name=llama,lmforge.dev/kind=TrainJob"},
    )


def one_pass(kind: Any, body: dict[str, Any], indexes: dict[str, Any]) -> float | None:
    memory = kind.memory(body["metadata"]["namespace"], body["metadata"]["name"])

    async def go() -> float | None:
        try:
            return await reconcile.reconcile(kind, memory, body, indexes, LOG, T0)
        finally:
            await kind.api.close()

    return asyncio.run(go())


@pytest.mark.parametrize("stored", [True, False], ids=["stale-view-409", "deleted-404"])
def test_trainjob_status_write_on_a_stale_view(apiserver, stored: bool) -> None:
    """The daemon decided on resourceVersion 1 but the job is at a newer one: the PUT fails with
    409, the job is read again and decided again at once; a job deleted meanwhile ends the daemon."""
    path = f"{LMFORGE}/trainjobs/llama"
    if stored:
        newer = apiserver.put(path, trainjob_body())
        assert newer["metadata"]["resourceVersion"] != "1"
    kind = trainjob.TrainJobs(cfg=tj_build.BuildConfig(), api_factory=lambda: api_for(apiserver))
    delay = one_pass(kind, trainjob_body(), {"pods": {}})
    memory = kind.memories[(NS, "llama")]
    if stored:
        assert delay == 0.0 and memory.latest == apiserver.objects[path]
        assert apiserver.calls() == [("PUT", path + "/status"), ("GET", path)]
    else:
        assert delay is None and apiserver.calls() == [("PUT", path + "/status")]
    assert not any(r.path.startswith(CORE) for r in apiserver.requests)  # nothing acted on a stale view
    assert memory.applied_generation is None  # nor applied its ConfigMap


# --- InferenceService ------------------------------------------------------------------------------


def isvc_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": NS, "uid": "uid-1", "generation": 2},
        "spec": {"model": {"source": "pvc://models/llama/merged"}, **spec},
    }


def isvc_kind(server) -> inferenceservice.InferenceServices:
    return inferenceservice.InferenceServices(
        cfg=isvc_build.BuildConfig(), api_factory=lambda: api_for(server)
    )


def deployment_index(server) -> dict[str, Any]:
    path = f"{APPS}/deployments/chat"
    if path not in server.objects:
        return {"pods": {}, "deployments": {}}
    return {"pods": {}, "deployments": {(NS, "chat"): [DeploymentView.from_deployment(server.objects[path])]}}


def test_inferenceservice_applies_its_objects(apiserver, monkeypatch) -> None:
    posted: list[str] = []
    monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: posted.append(reason))
    apiserver.put(f"{LMFORGE}/inferenceservices/chat", isvc_body(replicas=1))
    kind = isvc_kind(apiserver)
    assert one_pass(kind, isvc_body(replicas=1), deployment_index(apiserver)) == 0.0  # applied: look again
    assert (
        set(apiserver.calls())
        == {
            ("DELETE", f"{POLICY}/poddisruptionbudgets/chat"),
            ("PATCH", f"{APPS}/deployments/chat"),
            ("PATCH", f"{CORE}/services/chat"),
        }
        and len(apiserver.requests) == 3
    )  # one replica: no PDB; no status write before the apply went through
    applies = [r for r in apiserver.requests if r.method == "PATCH"]
    assert all(
        r.content_type == "application/apply-patch+yaml"
        and r.query == {"fieldManager": "lmforge-operator", "force": "true"}
        for r in applies
    )
    assert kind.memories[(NS, "chat")].applied_generation == 2 and posted == []

    apiserver.requests.clear()
    stored = apiserver.objects[f"{LMFORGE}/inferenceservices/chat"]
    one_pass(kind, stored, deployment_index(apiserver))  # the next pass: observedGeneration, Applied
    status = apiserver.objects[f"{LMFORGE}/inferenceservices/chat"]["status"]
    assert status["observedGeneration"] == 2 and status["selector"]
    assert posted[0] == "Applied"

    kind = isvc_kind(apiserver)  # a new generation: 3 replicas, with a PDB
    body = apiserver.objects[f"{LMFORGE}/inferenceservices/chat"]
    body = {**body, "metadata": {**body["metadata"], "generation": 3}, "spec": isvc_body(replicas=3)["spec"]}
    one_pass(kind, body, deployment_index(apiserver))
    assert ("PATCH", f"{POLICY}/poddisruptionbudgets/chat") in apiserver.calls()
    assert apiserver.objects[f"{APPS}/deployments/chat"]["spec"]["replicas"] == 3


def test_inferenceservice_keeps_the_autoscaled_size(apiserver) -> None:
    """With autoscaling, a re-apply keeps the size the autoscaler set (read from the Deployment)."""
    apiserver.put(
        f"{APPS}/deployments/chat",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"replicas": 4},
        },
    )
    body = isvc_body(autoscaling={"minReplicas": 1, "maxReplicas": 6})
    body["status"] = {"observedGeneration": 1}  # applied by an earlier operator: a resume
    kind = isvc_kind(apiserver)
    kind.memory(NS, "chat").scraped_at = float("inf")  # no scrape in this test
    one_pass(kind, body, deployment_index(apiserver))
    assert apiserver.objects[f"{APPS}/deployments/chat"]["spec"]["replicas"] == 4


def test_inferenceservice_api_failure_is_raised_for_a_retry(apiserver) -> None:
    apiserver.fail[("PATCH", f"{CORE}/services/chat")] = (500, "InternalError", "etcd timed out")
    with pytest.raises(ApiError, match="500 Internal Server Error: etcd timed out"):
        one_pass(isvc_kind(apiserver), isvc_body(), deployment_index(apiserver))


def test_inferenceservice_refused_object_fails_for_good(apiserver, monkeypatch) -> None:
    """422 on an owned object: terminal Failed/InvalidSpec naming the cause, Ready=False too."""
    posted: list[str] = []
    monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: posted.append(reason))
    apiserver.put(f"{LMFORGE}/inferenceservices/chat", isvc_body())
    apiserver.fail[("PATCH", f"{APPS}/deployments/chat")] = (422, "Invalid", "volumes[0].name: Invalid value")
    kind = isvc_kind(apiserver)
    delay = one_pass(
        kind, apiserver.objects[f"{LMFORGE}/inferenceservices/chat"], deployment_index(apiserver)
    )
    status = apiserver.objects[f"{LMFORGE}/inferenceservices/chat"]["status"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert delay is None and status["phase"] == "Failed"
    assert conditions == {"Failed": ("True", "InvalidSpec"), "Ready": ("False", "InvalidSpec")}
    assert "the API server refused an owned object" in status["conditions"][0]["message"]
    assert posted == ["InvalidSpec"]


def test_inferenceservice_restores_a_scaled_deployment(apiserver, monkeypatch) -> None:
    monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: None)
    apiserver.put(
        f"{APPS}/deployments/chat",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "chat"},
            "spec": {"replicas": 5},
        },
    )
    body = isvc_body(replicas=2)
    body["status"] = {"observedGeneration": 2}
    apiserver.put(f"{LMFORGE}/inferenceservices/chat", body)
    kind = isvc_kind(apiserver)
    memory = kind.memory(NS, "chat")
    memory.applied_generation, memory.applied_at = 2, float("inf")  # applied, no re-apply due
    one_pass(kind, apiserver.objects[f"{LMFORGE}/inferenceservices/chat"], deployment_index(apiserver))
    assert apiserver.objects[f"{APPS}/deployments/chat"]["spec"]["replicas"] == 2
    scale = next(r for r in apiserver.requests if r.path.endswith("/scale"))
    assert scale.query == {"fieldManager": "lmforge-operator"}
    assert memory.expected is not None and memory.expected[0] == 2


# --- the peering object (operator/main.py) ---------------------------------------------------------


@pytest.fixture
def kubeconfig_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    def point_at(server) -> None:
        path = tmp_path / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "c",
                    "clusters": [{"name": "c", "cluster": {"server": server.url}}],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(path))

    return point_at


def test_peering_object_cluster_wide(apiserver, kubeconfig_for) -> None:
    kubeconfig_for(apiserver)
    for _ in range(2):  # every replica runs it at start: AlreadyExists is success
        asyncio.run(main.ensure_peering_object(main.OperatorOptions()))
    assert list(apiserver.objects) == ["/apis/kopf.dev/v1/clusterkopfpeerings/lmforge"]


def test_peering_objects_per_namespace(apiserver, kubeconfig_for) -> None:
    kubeconfig_for(apiserver)
    apiserver.put(
        "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/lmforge", {"metadata": {"name": "lmforge"}}
    )
    asyncio.run(main.ensure_peering_object(main.OperatorOptions(namespaces=("team-a", "team-b"))))
    assert sorted(apiserver.objects) == [
        "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/lmforge",
        "/apis/kopf.dev/v1/namespaces/team-b/kopfpeerings/lmforge",
    ]


def test_peering_object_refused_is_logged_and_returned_for_a_retry(apiserver, kubeconfig_for, caplog) -> None:
    """D3: a 403 (terminating namespace) or 404 (missing namespace / CRD) never stops the operator;
    the namespaces that work are set up, the others come back for a retry."""
    kubeconfig_for(apiserver)
    apiserver.fail[("POST", "/apis/kopf.dev/v1/namespaces/gone/kopfpeerings")] = (
        403,
        "Forbidden",
        'kopfpeerings "lmforge" is forbidden: unable to create new content in namespace gone '
        "because it is being terminated",
    )
    with caplog.at_level(logging.WARNING, logger="lmforge.operator"):
        failed = asyncio.run(main.ensure_peering_object(main.OperatorOptions(namespaces=("gone", "team-a"))))
    assert [body["metadata"]["namespace"] for body in failed] == ["gone"]
    assert "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/lmforge" in apiserver.objects
    assert "namespace 'gone'): 403 Forbidden" in caplog.text


def test_inferenceservice_puts_back_an_edited_deployment(apiserver, monkeypatch) -> None:
    """D1: every REAPPLY_SECONDS the owned objects are server-side applied again, keeping the
    Deployment's size: a Deployment someone edited gets our template back."""
    monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: None)
    apiserver.put(f"{LMFORGE}/inferenceservices/chat", isvc_body(replicas=2))
    kind = isvc_kind(apiserver)
    one_pass(kind, isvc_body(replicas=2), deployment_index(apiserver))
    path = f"{APPS}/deployments/chat"
    desired = apiserver.objects[path]["spec"]["template"]
    drifted = json.loads(json.dumps(apiserver.objects[path]))
    drifted["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1"
    apiserver.put(path, drifted)
    kind = isvc_kind(apiserver)  # keeps nothing of the first client
    memory = kind.memory(NS, "chat")
    memory.applied_generation = 2  # applied a minute ago (applied_at 0)
    one_pass(kind, apiserver.objects[f"{LMFORGE}/inferenceservices/chat"], deployment_index(apiserver))
    assert apiserver.objects[path]["spec"]["template"] == desired
    assert apiserver.objects[path]["spec"]["replicas"] == 2


def test_trainjob_refusal_event_only_after_its_status_write(apiserver, monkeypatch) -> None:
    """D6: a refused worker pod sets Created=False naming the cause; the Event goes out once, after
    that status write, and not again for the same cause."""
    path = f"{LMFORGE}/trainjobs/llama"
    apiserver.put(path, trainjob_body())
    apiserver.fail[("POST", f"{CORE}/pods")] = (
        403,
        "Forbidden",
        'pods "llama-0" is forbidden: error looking up service account team-a/trainer: '
        'serviceaccount "trainer" not found',
    )
    posted: list[str] = []
    monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: posted.append(reason))
    kind = trainjob.TrainJobs(
        cfg=tj_build.BuildConfig(service_account="trainer"), api_factory=lambda: api_for(apiserver)
    )
    delays = [one_pass(kind, apiserver.objects[path], {"pods": {}}) for _ in range(3)]
    created = next(c for c in apiserver.objects[path]["status"]["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "ServiceAccountMissing")
    assert posted.count("ServiceAccountMissing") == 1
    assert delays[-1] == trainjob.REFUSED_RETRY_SECONDS
