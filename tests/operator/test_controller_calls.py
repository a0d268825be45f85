"""What the controllers send through operator/kube.py, against the in-memory API server of
tests/operator/conftest.py: the calls (and so the RBAC rows they need), and the 404/409 paths
that make every step safe to repeat. Paths that post kopf Events run in the e2e suites."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes.client.configuration import Configuration

from lmforge.devcluster.factories import T0, spec_dict
from lmforge.operator import main
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders import inferenceservice as isvc_build
from lmforge.operator.builders import trainjob as tj_build
from lmforge.operator.builders.inferenceservice_status import DeploymentView
from lmforge.operator.builders.trainjob_policy import Decision, Observed, decide
from lmforge.operator.controllers import inferenceservice, trainjob
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


def test_trainjob_creates_the_gang_once(apiserver) -> None:
    job = trainjob_body()
    spec = TrainJobSpec.model_validate(job["spec"])
    decision = decide(
        Observed(name="llama", generation=1, spec=spec, status=TrainJobStatus(), pods=(), now=T0)
    )
    assert decision.create_ranks == (0, 1)

    async def act_twice() -> None:
        api = api_for(apiserver)
        try:
            await trainjob._act(api, tj_build.BuildConfig(), job, spec, decision)
            await trainjob._act(api, tj_build.BuildConfig(), job, spec, decision)  # a restarted operator
        finally:
            await api.close()

    asyncio.run(act_twice())
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
    spec = TrainJobSpec.model_validate(job["spec"])
    decision = decide(
        Observed(name="llama", generation=2, spec=spec, status=TrainJobStatus(), pods=(), now=T0)
    )

    async def act() -> None:
        api = api_for(apiserver)
        try:
            await trainjob._act(api, tj_build.BuildConfig(), job, spec, decision)
        finally:
            await api.close()

    asyncio.run(act())
    assert json.loads(apiserver.objects[path]["data"]["train.json"])["model"] == "/models/new"
    assert apiserver.calls()[0] in {("PATCH", path), ("PATCH", f"{CORE}/services/llama")}  # before any pod


def test_trainjob_refused_pod_is_reported_not_raised_as_an_api_error(apiserver) -> None:
    """D6: a 403 on pod creation (missing ServiceAccount) is a PodRefused naming the pod."""
    apiserver.fail[("POST", f"{CORE}/pods")] = (
        403,
        "Forbidden",
        'pods "llama-0" is forbidden: error looking up '
        'service account team-a/trainer: serviceaccount "trainer" not found',
    )
    job = trainjob_body()
    spec = TrainJobSpec.model_validate(job["spec"])
    decision = decide(
        Observed(name="llama", generation=1, spec=spec, status=TrainJobStatus(), pods=(), now=T0)
    )

    async def act() -> None:
        api = api_for(apiserver)
        try:
            await trainjob._act(api, tj_build.BuildConfig(service_account="trainer"), job, spec, decision)
        finally:
            await api.close()

    with pytest.raises(trainjob.PodRefused) as refused:
        asyncio.run(act())
    assert refused.value.pod == "llama-0" and refused.value.error.status == 403
    assert "serviceaccount" in refused.value.error.message


def test_trainjob_deletes_pods_gracefully_or_at_once(apiserver) -> None:
    for name in ("llama-0", "llama-1"):
        apiserver.put(f"{CORE}/pods/{name}", {"metadata": {"name": name, "namespace": NS}})
    job = trainjob_body()
    spec = TrainJobSpec.model_validate(job["spec"])
    decision = Decision(
        status=TrainJobStatus(), delete_pods=("llama-0", "gone"), force_delete_pods=("llama-1",)
    )

    async def act() -> None:
        api = api_for(apiserver)
        try:
            await trainjob._act(api, tj_build.BuildConfig(), job, spec, decision)
        finally:
            await api.close()

    asyncio.run(act())
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
    job = trainjob_body()
    spec = TrainJobSpec.model_validate(job["spec"])

    async def act() -> None:
        api = api_for(apiserver)
        try:
            await trainjob._act(
                api, tj_build.BuildConfig(), job, spec, Decision(status=TrainJobStatus(), delete_job=True)
            )
            await trainjob.delete_children(
                api, NS, "llama"
            )  # kopf's delete handler after it: all gone already
        finally:
            await api.close()

    asyncio.run(act())
    assert list(apiserver.objects) == [f"{CORE}/pods/other-0"]
    collection = next(r for r in apiserver.requests if r.path == f"{CORE}/pods")
    assert (collection.method, collection.query) == (
        "DELETE",
        {"labelSelector": "lmforge.dev/job-name=llama,lmforge.dev/kind=TrainJob"},
    )


@pytest.mark.parametrize("stored", [True, False], ids=["stale-view-409", "deleted-404"])
def test_trainjob_status_write_on_a_stale_view(apiserver, stored: bool) -> None:
    """The daemon decided on resourceVersion 1 but the job is at a newer one: the PUT fails with
    409, the job is read again and decided again at once; a job deleted meanwhile ends the daemon."""
    path = f"{LMFORGE}/trainjobs/llama"
    if stored:
        newer = apiserver.put(path, trainjob_body())
        assert newer["metadata"]["resourceVersion"] != "1"
    runtime = trainjob.Runtime(cfg=tj_build.BuildConfig(), api_factory=lambda: api_for(apiserver))
    handle = runtime.handle(NS, "llama")

    async def reconcile() -> float | None:
        try:
            return await trainjob.reconcile(runtime, handle, trainjob_body(), {}, LOG)
        finally:
            await runtime.api.close()

    delay = asyncio.run(reconcile())
    if stored:
        assert delay == 0.0 and handle.latest == apiserver.objects[path]
        assert apiserver.calls() == [("PUT", path + "/status"), ("GET", path)]
    else:
        assert delay is None and apiserver.calls() == [("PUT", path + "/status")]
    assert not any(r.path.startswith(CORE) for r in apiserver.requests)  # nothing acted on a stale view
    assert handle.applied_generation is None  # nor applied its ConfigMap


# --- InferenceService ------------------------------------------------------------------------------


def isvc_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": NS, "uid": "uid-1", "generation": 2},
        "spec": {"model": {"source": "pvc://models/llama/merged"}, **spec},
    }


def apply_isvc(server, body: dict[str, Any]) -> tuple[kopf.Patch, inferenceservice.Runtime]:
    runtime = inferenceservice.Runtime(cfg=isvc_build.BuildConfig(), api_factory=lambda: api_for(server))
    memo = kopf.Memo()
    memo.inferenceservice = runtime
    patch = kopf.Patch()

    async def handler() -> None:
        try:
            await inferenceservice.apply(
                body=body,
                meta=body["metadata"],
                namespace=NS,
                name="chat",
                uid="uid-1",
                reason="resume",
                diff=(),
                patch=patch,
                memo=memo,
                logger=LOG,
            )
        finally:
            await runtime.api.close()

    asyncio.run(handler())
    return patch, runtime


def test_inferenceservice_applies_its_objects(apiserver) -> None:
    patch, runtime = apply_isvc(apiserver, isvc_body(replicas=1))
    assert apiserver.calls() == [
        ("GET", f"{APPS}/deployments/chat"),
        ("PATCH", f"{APPS}/deployments/chat"),
        ("PATCH", f"{CORE}/services/chat"),
        ("DELETE", f"{POLICY}/poddisruptionbudgets/chat"),
    ]  # one replica: no PDB
    applies = [r for r in apiserver.requests if r.method == "PATCH"]
    assert all(
        r.content_type == "application/apply-patch+yaml"
        and r.query == {"fieldManager": "lmforge-operator", "force": "true"}
        for r in applies
    )
    assert patch.status["observedGeneration"] == 2 and patch.status["selector"]
    assert runtime.handles[(NS, "chat")].applied_generation == 2

    apiserver.requests.clear()
    apply_isvc(apiserver, isvc_body(replicas=3))
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
    apply_isvc(apiserver, isvc_body(autoscaling={"minReplicas": 1, "maxReplicas": 6}))
    assert apiserver.objects[f"{APPS}/deployments/chat"]["spec"]["replicas"] == 4


def test_inferenceservice_api_failure_is_retried(apiserver) -> None:
    apiserver.fail[("PATCH", f"{CORE}/services/chat")] = (500, "InternalError", "etcd timed out")
    with pytest.raises(kopf.TemporaryError, match="500 Internal Server Error: etcd timed out"):
        apply_isvc(apiserver, isvc_body())


def test_inferenceservice_scale(apiserver) -> None:
    apiserver.put(f"{APPS}/deployments/chat", {"metadata": {"name": "chat"}, "spec": {"replicas": 1}})
    runtime = inferenceservice.Runtime(cfg=isvc_build.BuildConfig(), api_factory=lambda: api_for(apiserver))
    handle = runtime.handle(NS, "chat")

    async def scale() -> None:
        try:
            await inferenceservice._scale(runtime, handle, NS, "chat", 3, inferenceservice.AUTOSCALER_MANAGER)
        finally:
            await runtime.api.close()

    asyncio.run(scale())
    assert apiserver.objects[f"{APPS}/deployments/chat"]["spec"]["replicas"] == 3
    assert apiserver.requests[0].query == {"fieldManager": "lmforge-autoscaler"}
    assert handle.expected is not None and handle.expected[0] == 3


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


def test_inferenceservice_timer_puts_back_an_edited_deployment(apiserver, monkeypatch) -> None:
    """D1: every REAPPLY_SECONDS the timer server-side applies the owned objects again, keeping the
    Deployment's size: a Deployment someone edited gets our template back."""
    _, runtime = apply_isvc(apiserver, isvc_body(replicas=2))
    path = f"{APPS}/deployments/chat"
    desired = apiserver.objects[path]["spec"]["template"]
    drifted = json.loads(json.dumps(apiserver.objects[path]))
    drifted["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1"
    apiserver.put(path, drifted)
    handle = runtime.handle(NS, "chat")
    handle.applied_at -= inferenceservice.REAPPLY_SECONDS  # the last apply was a minute ago
    monkeypatch.setattr(inferenceservice, "_post", lambda body, events: None)  # Events need kopf's loop
    view = DeploymentView.from_deployment(apiserver.objects[path])

    async def timer() -> None:
        try:
            body = isvc_body(replicas=2)
            await inferenceservice.observe(
                body=body,
                meta=body["metadata"],
                namespace=NS,
                name="chat",
                patch=kopf.Patch(),
                memo=memo_of(runtime),
                logger=LOG,
                inferenceservice_pods={},
                inferenceservice_deployments={(NS, "chat"): [view]},
            )
        finally:
            await runtime.api.close()

    asyncio.run(timer())
    assert apiserver.objects[path]["spec"]["template"] == desired
    assert apiserver.objects[path]["spec"]["replicas"] == 2


def memo_of(runtime: inferenceservice.Runtime) -> kopf.Memo:
    memo = kopf.Memo()
    memo.inferenceservice = runtime
    return memo


def test_trainjob_refusal_event_only_after_its_status_write(apiserver, monkeypatch) -> None:
    """D6: kopf's own patches race with the first status write (409): the job is read again and the
    condition written; the Event goes out once, after the write, and not again for the same cause."""
    path = f"{LMFORGE}/trainjobs/llama"
    stored = apiserver.put(path, trainjob_body())  # newer than the view the daemon holds
    posted: list[str] = []
    monkeypatch.setattr(trainjob.kopf, "event", lambda obj, type, reason, message: posted.append(reason))
    runtime = trainjob.Runtime(
        cfg=tj_build.BuildConfig(service_account="trainer"), api_factory=lambda: api_for(apiserver)
    )
    handle = runtime.handle(NS, "llama")
    error = ApiError(
        403,
        "Forbidden",
        json.dumps(
            {
                "message": 'pods "llama-0" is forbidden: error looking up service '
                'account team-a/trainer: serviceaccount "trainer" not found'
            }
        ),
    )

    async def refuse_twice() -> None:
        try:
            for _ in range(2):
                await trainjob._record_refusal(
                    runtime, handle, trainjob_body(), 1, trainjob.PodRefused("llama-0", error), LOG
                )
        finally:
            await runtime.api.close()

    asyncio.run(refuse_twice())
    assert stored["metadata"]["resourceVersion"] != "1"
    created = next(c for c in apiserver.objects[path]["status"]["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "ServiceAccountMissing")
    assert posted == ["ServiceAccountMissing"]
