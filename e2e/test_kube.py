"""operator/kube.py, the operator's one Kubernetes client, against the real kube-apiserver of the
local cluster (tests/operator/test_kube.py checks the same calls against an in-memory fake):
credentials from the cluster's kubeconfig (TLS, client certificates) through
`KubeApi.from_environment`, and the answers that the controllers rely on, as the API server
really gives them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmforge.operator.kube import (
    CLUSTER_KOPF_PEERINGS,
    CONFIG_MAPS,
    DEPLOYMENTS,
    PODS,
    TRAINJOBS,
    ApiError,
    KubeApi,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
NS = f"e2e-kube-{uuid.uuid4().hex[:6]}"  # fresh per session, even on a reused cluster
IMAGE = "registry.invalid/lmforge/fake:1"  # never pulled: kwok runs no containers
NO_NODE = (
    "e2e-kube-no-such-node"  # bound pods nobody runs: kwok leaves them alone, no kubelet confirms a delete
)


@pytest.fixture(scope="module")
def kube(cluster) -> Iterator[Callable[[Callable[[KubeApi], Awaitable[Any]]], Any]]:
    """`kube(calls)`: runs `calls(api)` on a fresh event loop with a client built the way the
    operator builds its own (KUBECONFIG is the cluster's here), in a namespace of this module
    with the CRDs installed; the namespace is deleted afterwards."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/trainjobs.lmforge.dev",
        "crd/clusterkopfpeerings.kopf.dev",
    )
    cluster.kubectl("create", "namespace", NS)
    configuration = KubeApi.from_environment()._config

    def run(calls: Callable[[KubeApi], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            api = KubeApi(configuration)
            try:
                return await calls(api)
            finally:
                await api.close()

        return asyncio.run(main())

    yield run
    cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def config_map(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "data": {"key": name},
    }


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeName": NO_NODE,
            "terminationGracePeriodSeconds": 600,
            "containers": [{"name": "main", "image": IMAGE}],
        },
    }


def deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": IMAGE}]},
            },
        },
    }


def trainjob(name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "model": "/models/llama",
        "dataset": {"source": "/data/train.jsonl"},
        "output": {"dir": "/out/llama"},
    }
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {**base, **spec},
    }


def managers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["manager"]: entry for entry in obj["metadata"]["managedFields"]}


def test_get_of_a_missing_object_is_none(kube) -> None:
    async def calls(api: KubeApi) -> list[Any]:
        return [
            await api.get(PODS, NS, "missing"),
            await api.get(TRAINJOBS, NS, "missing"),
            await api.get(CONFIG_MAPS, "e2e-kube-no-such-namespace", "missing"),
            await api.get(CLUSTER_KOPF_PEERINGS, None, "e2e-kube-missing"),
        ]

    assert kube(calls) == [None, None, None, None]


def test_second_create_of_a_name_is_none_and_changes_nothing(kube) -> None:
    async def calls(api: KubeApi) -> tuple[Any, Any, Any]:
        first = await api.create(config_map("twice"))
        second = await api.create({**config_map("twice"), "data": {"key": "other"}})
        return first, second, await api.get(CONFIG_MAPS, NS, "twice")

    first, second, stored = kube(calls)
    assert first["metadata"]["uid"] and first["metadata"]["namespace"] == NS
    assert second is None  # 409 AlreadyExists
    assert stored["data"] == {"key": "twice"}
    assert stored["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_apply_and_scale_record_their_field_managers(kube) -> None:
    async def calls(api: KubeApi) -> tuple[Any, ...]:
        applied = await api.apply(deployment("web", 1), "e2e-kube-apply")
        scale = await api.scale(DEPLOYMENTS, NS, "web", 3, "e2e-kube-scale")
        scaled = await api.get(DEPLOYMENTS, NS, "web")
        reapplied = await api.apply(deployment("web", 1), "e2e-kube-apply")  # force: takes replicas back
        return applied, scale, scaled, reapplied

    applied, scale, scaled, reapplied = kube(calls)
    assert applied["spec"]["replicas"] == 1 and applied["metadata"]["uid"]  # apply created it
    entry = managers(applied)["e2e-kube-apply"]
    assert entry["operation"] == "Apply"
    assert "f:replicas" in entry["fieldsV1"]["f:spec"]

    assert (scale["kind"], scale["spec"]["replicas"]) == ("Scale", 3)
    assert scaled["spec"]["replicas"] == 3
    entry = managers(scaled)["e2e-kube-scale"]
    assert (entry["operation"], entry.get("subresource")) == ("Update", "scale")
    assert "f:replicas" in entry["fieldsV1"]["f:spec"]

    assert reapplied["spec"]["replicas"] == 1  # a forced apply wins the conflict over spec.replicas
    assert "f:replicas" in managers(reapplied)["e2e-kube-apply"]["fieldsV1"]["f:spec"]
    assert "f:replicas" not in managers(reapplied).get("e2e-kube-scale", {}).get("fieldsV1", {}).get(
        "f:spec", {}
    )


def test_pod_delete_graceful_then_immediate(kube) -> None:
    async def calls(api: KubeApi) -> tuple[Any, ...]:
        await api.create(pod("graceful"))
        await api.create(pod("immediate"))
        await api.delete(PODS, NS, "graceful")  # the pod's own 600 s: it stays, terminating
        terminating = await api.get(PODS, NS, "graceful")
        await api.delete(PODS, NS, "immediate", grace_period_seconds=0)
        immediate = await api.get(PODS, NS, "immediate")
        await api.delete(PODS, NS, "graceful", grace_period_seconds=0)  # shortens the grace: gone now
        graceful = await api.get(PODS, NS, "graceful")
        await api.delete(PODS, NS, "graceful", grace_period_seconds=0)  # 404: counts as deleted
        return terminating, immediate, graceful

    terminating, immediate, graceful = kube(calls)
    assert terminating is not None and terminating["spec"]["nodeName"] == NO_NODE
    assert terminating["metadata"]["deletionTimestamp"]
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 600
    assert immediate is None
    assert graceful is None


def test_delete_collection_takes_only_the_selected_labels(kube, cluster) -> None:
    async def calls(api: KubeApi) -> None:
        for obj in (
            config_map("a1", set="a"),
            config_map("a2", set="a", tier="x"),
            config_map("b1", set="b"),
            config_map("plain"),
        ):
            assert await api.create(obj) is not None
        await api.delete_collection(CONFIG_MAPS, NS, "set=a")
        await api.delete_collection(CONFIG_MAPS, NS, "set=none")  # matches nothing: fine

    kube(calls)
    left = {item["metadata"]["name"] for item in cluster.kubectl_json("get", "configmaps", "-n", NS)["items"]}
    assert {"b1", "plain"} <= left
    assert not {"a1", "a2"} & left


def test_invalid_objects_are_a_422_with_the_servers_message(kube) -> None:
    async def calls(api: KubeApi) -> list[ApiError]:
        errors = []
        bad_volume = deployment("bad-volume", 1)
        bad_volume["spec"]["template"]["spec"]["volumes"] = [{"name": "Not_A_DNS_Label", "emptyDir": {}}]
        no_model = trainjob("no-model")
        del no_model["spec"]["model"]
        job = await api.create(trainjob("bad-status"))
        for attempt in (
            lambda: api.create(config_map("Not_Valid")),  # POST: built-in validation of the name
            lambda: api.create(no_model),  # POST: the CRD's OpenAPI schema
            lambda: api.create(
                trainjob("forbidden-lora", method="full", lora={"r": 8})
            ),  # POST: a CEL rule of the CRD
            lambda: api.apply(bad_volume, "e2e-kube-apply"),  # server-side apply
            lambda: api.replace_status(
                {**job, "status": {"phase": "Bogus"}}
            ),  # PUT status: its schema's enum
        ):
            with pytest.raises(ApiError) as caught:
                await attempt()
            errors.append(caught.value)
        return errors

    name, model, lora, volume, status = kube(calls)
    for error in (name, model, lora, volume, status):
        assert (error.status, error.reason) == (422, "Unprocessable Entity"), error
        assert json.loads(error.body)["reason"] == "Invalid"
        assert str(error).startswith("422 Unprocessable Entity: ")
        assert error.message[:500] in str(error)
    assert 'ConfigMap "Not_Valid" is invalid' in name.message and "metadata.name" in name.message
    assert 'TrainJob.lmforge.dev "no-model" is invalid' in model.message and "spec.model" in model.message
    assert "lora may only be set when method is lora" in lora.message
    assert 'Deployment.apps "bad-volume" is invalid' in volume.message and "volumes[0].name" in volume.message
    assert "status.phase" in status.message and "Bogus" in status.message


def test_stale_status_write_is_a_409(kube) -> None:
    async def calls(api: KubeApi) -> tuple[Any, ...]:
        created = await api.create(trainjob("stale"))
        written = await api.replace_status({**created, "status": {"phase": "Pending"}})
        with pytest.raises(ApiError) as stale:  # created's resourceVersion is older than the write
            await api.replace_status({**created, "status": {"phase": "Running"}})
        fresh = await api.replace_status({**written, "status": {"phase": "Running"}})
        return created, written, stale.value, fresh, await api.get(TRAINJOBS, NS, "stale")

    created, written, stale, fresh, stored = kube(calls)
    assert written["status"]["phase"] == "Pending"
    assert written["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    assert (stale.status, stale.reason) == (409, "Conflict")
    assert "the object has been modified" in stale.message
    assert fresh["status"]["phase"] == "Running"
    assert stored["status"]["phase"] == "Running"
    assert stored["spec"] == created["spec"]


def test_after_delete_get_is_none_and_writes_are_404(kube) -> None:
    async def calls(api: KubeApi) -> tuple[Any, ...]:
        job = await api.create(trainjob("deleted"))
        await api.apply(deployment("deleted", 0), "e2e-kube-apply")
        await api.delete(TRAINJOBS, NS, "deleted")
        await api.delete(DEPLOYMENTS, NS, "deleted", grace_period_seconds=0)
        gone = (await api.get(TRAINJOBS, NS, "deleted"), await api.get(DEPLOYMENTS, NS, "deleted"))
        errors = []
        for attempt in (
            lambda: api.replace_status({**job, "status": {"phase": "Running"}}),
            lambda: api.scale(DEPLOYMENTS, NS, "deleted", 2, "e2e-kube-scale"),
        ):
            with pytest.raises(ApiError) as caught:
                await attempt()
            errors.append(caught.value)
        await api.delete(TRAINJOBS, NS, "deleted")  # twice: 404 counts as deleted
        return gone, errors

    gone, (status, scale) = kube(calls)
    assert gone == (None, None)
    assert (status.status, status.reason) == (404, "Not Found")
    assert 'trainjobs.lmforge.dev "deleted" not found' in status.message
    assert (scale.status, scale.reason) == (404, "Not Found")
    assert 'deployments.apps "deleted" not found' in scale.message


def test_cluster_scoped_create_and_delete(kube) -> None:
    name = f"{NS}-peering"
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}

    async def calls(api: KubeApi) -> tuple[Any, ...]:
        try:
            created = await api.create(peering)
            again = await api.create(peering)
            got = await api.get(CLUSTER_KOPF_PEERINGS, None, name)
        finally:
            await api.delete(CLUSTER_KOPF_PEERINGS, None, name)
        return created, again, got, await api.get(CLUSTER_KOPF_PEERINGS, None, name)

    created, again, got, after = kube(calls)
    assert created["metadata"]["name"] == name and "namespace" not in created["metadata"]
    assert again is None
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    assert after is None
