"""operator/kube.py, the operator's one Kubernetes client: real HTTP (and TLS with client
certificates) against the in-memory API server of tests/operator/conftest.py."""

from __future__ import annotations

import ast
import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.configuration import Configuration

from lmforge.operator import kube
from lmforge.operator.kube import (
    CLUSTER_KOPF_PEERINGS,
    CONFIG_MAPS,
    DEPLOYMENTS,
    JOBS,
    PODS,
    TRAINJOBS,
    ApiError,
    KubeApi,
    Resource,
)

OPERATOR_DIR = Path(kube.__file__).resolve().parent
NS = "team-a"


def run(api: KubeApi, calls: Callable[[KubeApi], Awaitable[Any]]) -> Any:
    """Run `calls(api)` in a fresh event loop and close the client's session afterwards."""

    async def main() -> Any:
        try:
            return await calls(api)
        finally:
            await api.close()

    return asyncio.run(main())


def client(server) -> KubeApi:
    return KubeApi(Configuration(host=server.url))


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": replicas},
    }


# --- paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "args", "want"),
    [
        (PODS, (NS,), "/api/v1/namespaces/team-a/pods"),
        (PODS, (NS, "p", "status"), "/api/v1/namespaces/team-a/pods/p/status"),
        (DEPLOYMENTS, (NS, "d", "scale"), "/apis/apps/v1/namespaces/team-a/deployments/d/scale"),
        (JOBS, (NS, "j"), "/apis/batch/v1/namespaces/team-a/jobs/j"),
        (TRAINJOBS, (NS, "t", "status"), "/apis/lmforge.dev/v1alpha1/namespaces/team-a/trainjobs/t/status"),
        (CLUSTER_KOPF_PEERINGS, (None, "lmforge"), "/apis/kopf.dev/v1/clusterkopfpeerings/lmforge"),
    ],
)
def test_resource_paths(resource: Resource, args: tuple, want: str) -> None:
    assert resource.path(*args) == want


def test_namespaced_resource_needs_a_namespace() -> None:
    with pytest.raises(ValueError, match="namespaced"):
        PODS.path(None, "p")


def test_every_kind_the_builders_make_has_a_resource() -> None:
    from lmforge.operator.builders import inferenceservice as isvc
    from lmforge.operator.builders import quantizejob, trainjob

    for module, kinds in (
        (trainjob, ("Pod", "Service", "ConfigMap")),
        (isvc, ("Deployment", "Service", "PodDisruptionBudget")),
        (quantizejob, ("Job", "InferenceService")),
    ):
        source = Path(module.__file__).read_text()
        for kind in kinds:
            assert f'"{kind}"' in source, (module.__name__, kind)
            assert any(k == kind for _, k in kube.KINDS), kind
    with pytest.raises(ValueError, match="no REST resource"):
        kube.resource_of({"apiVersion": "v1", "kind": "Secret"})


def test_no_controller_uses_the_official_client() -> None:
    """One client: only kube.py touches the `kubernetes` package (for its credential loader)."""
    files = [*sorted((OPERATOR_DIR / "controllers").glob("*.py")), OPERATOR_DIR / "main.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "kubernetes" or n.startswith("kubernetes.") for n in names), path.name


# --- the calls ------------------------------------------------------------------------------------


def test_get_returns_none_when_missing(apiserver) -> None:
    apiserver.put(f"/apis/apps/v1/namespaces/{NS}/deployments/chat", deployment("chat", 3))

    async def calls(api: KubeApi) -> tuple:
        return await api.get(DEPLOYMENTS, NS, "chat"), await api.get(DEPLOYMENTS, NS, "other")

    found, missing = run(client(apiserver), calls)
    assert found["spec"]["replicas"] == 3 and missing is None


def test_create_is_idempotent_for_fixed_names(apiserver) -> None:
    async def calls(api: KubeApi) -> tuple:
        return await api.create(pod("p0")), await api.create(pod("p0"))

    first, again = run(client(apiserver), calls)
    assert first["metadata"]["name"] == "p0" and again is None  # 409 AlreadyExists: success
    assert apiserver.calls() == [("POST", f"/api/v1/namespaces/{NS}/pods")] * 2
    assert apiserver.requests[0].content_type == "application/json"
    assert apiserver.requests[0].body == pod("p0")


def test_apply_is_server_side_apply_with_force(apiserver) -> None:
    async def calls(api: KubeApi) -> None:
        await api.apply(deployment("chat", 2), "lmforge-operator")
        await api.apply(deployment("chat", 4), "lmforge-operator")

    run(client(apiserver), calls)
    first = apiserver.requests[0]
    assert (first.method, first.path) == ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/chat")
    assert first.content_type == "application/apply-patch+yaml"
    assert first.query == {"fieldManager": "lmforge-operator", "force": "true"}
    assert apiserver.objects[first.path]["spec"]["replicas"] == 4


def test_replace_status_is_optimistic(apiserver) -> None:
    path = f"/apis/lmforge.dev/v1alpha1/namespaces/{NS}/trainjobs/llama"
    job = apiserver.put(
        path,
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": "llama", "namespace": NS},
            "spec": {},
        },
    )

    async def calls(api: KubeApi) -> tuple:
        written = await api.replace_status({**job, "status": {"phase": "Pending"}})
        with pytest.raises(ApiError) as stale:  # `job` carries the resourceVersion before our write
            await api.replace_status({**job, "status": {"phase": "Running"}})
        del apiserver.objects[path]
        with pytest.raises(ApiError) as gone:
            await api.replace_status({**written, "status": {"phase": "Running"}})
        return written, stale.value, gone.value

    written, stale, gone = run(client(apiserver), calls)
    assert written["status"] == {"phase": "Pending"}
    assert int(written["metadata"]["resourceVersion"]) > int(job["metadata"]["resourceVersion"])
    assert stale.status == 409 and "the object has been modified" in stale.message
    assert gone.status == 404
    assert apiserver.calls()[0] == ("PUT", path + "/status")


def test_scale_patches_the_scale_subresource(apiserver) -> None:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/chat"
    apiserver.put(path, deployment("chat", 1))

    async def calls(api: KubeApi) -> ApiError:
        await api.scale(DEPLOYMENTS, NS, "chat", 5, "lmforge-autoscaler")
        with pytest.raises(ApiError) as missing:
            await api.scale(DEPLOYMENTS, NS, "gone", 5, "lmforge-autoscaler")
        return missing.value

    missing = run(client(apiserver), calls)
    request = apiserver.requests[0]
    assert (request.method, request.path, request.query) == (
        "PATCH",
        path + "/scale",
        {"fieldManager": "lmforge-autoscaler"},
    )
    assert request.content_type == "application/merge-patch+json"
    assert request.body == {"spec": {"replicas": 5}}
    assert apiserver.objects[path]["spec"]["replicas"] == 5
    assert missing.status == 404


def test_delete_counts_missing_as_deleted(apiserver) -> None:
    apiserver.put(f"/api/v1/namespaces/{NS}/pods/p0", pod("p0"))

    async def calls(api: KubeApi) -> None:
        await api.delete(PODS, NS, "p0", grace_period_seconds=0)
        await api.delete(PODS, NS, "p0")  # 404: fine
        await api.delete(CONFIG_MAPS, NS, "never-was")

    run(client(apiserver), calls)
    assert not apiserver.objects
    assert [r.query for r in apiserver.requests] == [{"gracePeriodSeconds": "0"}, {}, {}]


def test_delete_collection_by_label(apiserver) -> None:
    for name, job in (("a-0", "a"), ("a-1", "a"), ("b-0", "b")):
        apiserver.put(f"/api/v1/namespaces/{NS}/pods/{name}", pod(name, job=job, kind="TrainJob"))

    async def calls(api: KubeApi) -> None:
        await api.delete_collection(PODS, NS, "job=a,kind=TrainJob")
        with pytest.raises(ValueError, match="label selector"):
            await api.delete_collection(PODS, NS, "")

    run(client(apiserver), calls)
    assert list(apiserver.objects) == [f"/api/v1/namespaces/{NS}/pods/b-0"]
    assert apiserver.requests[0].query == {"labelSelector": "job=a,kind=TrainJob"}


def test_errors_carry_status_and_message(apiserver) -> None:
    path = f"/apis/batch/v1/namespaces/{NS}/jobs"
    apiserver.fail[("POST", path)] = (
        422,
        "Invalid",
        'Job.batch "q" is invalid: spec.template.spec.volumes[0].name',
    )
    apiserver.fail[("GET", f"{path}/q")] = (
        403,
        "Forbidden",
        'jobs.batch "q" is forbidden: User "x" cannot get',
    )

    async def calls(api: KubeApi) -> tuple:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "q", "namespace": NS}}
        with pytest.raises(ApiError) as invalid:
            await api.create(job)
        with pytest.raises(ApiError) as forbidden:
            await api.get(JOBS, NS, "q")
        return invalid.value, forbidden.value

    invalid, forbidden = run(client(apiserver), calls)
    assert (invalid.status, invalid.reason) == (422, "Unprocessable Entity")
    assert invalid.message == 'Job.batch "q" is invalid: spec.template.spec.volumes[0].name'
    assert str(invalid) == f"422 Unprocessable Entity: {invalid.message}"
    assert forbidden.status == 403


def test_error_without_a_status_body() -> None:
    error = ApiError(502, "Bad Gateway", "<html>upstream down</html>")
    assert error.message == "<html>upstream down</html>" and "502 Bad Gateway" in str(error)


def test_session_is_reopened_after_close(apiserver) -> None:
    api = client(apiserver)
    for _ in range(2):  # two event loops, as kopf's startup thread and the operator loop would be
        assert run(api, lambda a: a.get(PODS, NS, "p")) is None


# --- credentials ----------------------------------------------------------------------------------


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], ca: Path | None = None) -> Path:
    cluster: dict[str, Any] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


@pytest.fixture
def outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_environment prefers the in-cluster service account: make sure there is none."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_bearer_token_from_kubeconfig(
    outside_a_pod, start_apiserver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_apiserver(token="s3cret")
    monkeypatch.setenv(
        "KUBECONFIG", str(write_kubeconfig(tmp_path / "config", server.url, {"token": "s3cret"}))
    )
    assert run(KubeApi.from_environment(), lambda a: a.get(PODS, NS, "p")) is None  # 404, not 401
    assert server.requests[0].authorization == "Bearer s3cret"
    with pytest.raises(ApiError) as refused:
        run(client(server), lambda a: a.get(PODS, NS, "p"))  # no credentials
    assert refused.value.status == 401


def test_client_certificate_and_ca_from_kubeconfig(
    outside_a_pod, start_apiserver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS as the local cluster does it: its own CA, a serving cert for 127.0.0.1, the admin's
    client certificate (which the server requires)."""
    from lmforge.devcluster.cluster.certs import CertError, ensure_pki

    try:
        pki = ensure_pki(tmp_path / "pki")
    except CertError as error:
        pytest.skip(str(error))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    context.load_cert_chain(pki.apiserver_cert, pki.apiserver_key)
    context.verify_mode = ssl.CERT_REQUIRED
    server = start_apiserver(ssl_context=context)
    user = {"client-certificate": str(pki.client_cert("admin")), "client-key": str(pki.client_key("admin"))}
    monkeypatch.setenv(
        "KUBECONFIG", str(write_kubeconfig(tmp_path / "config", server.url, user, pki.ca_cert))
    )

    created = run(KubeApi.from_environment(), lambda a: a.create(pod("p0")))
    assert created["metadata"]["name"] == "p0"
    assert server.requests[0].client_cn == "kubernetes-admin"

    untrusted = write_kubeconfig(tmp_path / "untrusted", server.url, user)  # no CA: the server is not trusted
    monkeypatch.setenv("KUBECONFIG", str(untrusted))
    with pytest.raises(Exception, match="(?i)certificate"):
        run(KubeApi.from_environment(), lambda a: a.get(PODS, NS, "p0"))
