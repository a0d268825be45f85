"""D3: our finalizer leaves objects of a terminating namespace (operator/controllers/namespace_release.py),
against the in-memory API server of tests/operator/conftest.py."""

from __future__ import annotations

import asyncio
import logging

from kubernetes.client.configuration import Configuration

from lmforge.operator.controllers import namespace_release
from lmforge.operator.kube import ControllerRuntime, KubeApi

FINALIZER = "lmforge.dev/finalizer"
DELETED = "2027-01-15T08:00:00Z"


def obj(name: str, deleted: bool, finalizers: list[str]) -> dict:
    meta = {"name": name, "namespace": "doomed", "finalizers": finalizers}
    return {"metadata": {**meta, **({"deletionTimestamp": DELETED} if deleted else {})}}


def test_terminating_keeps_only_watched_namespaces() -> None:
    items = [
        {"metadata": {"name": "a", "deletionTimestamp": DELETED}},
        {"metadata": {"name": "b"}},
        {"metadata": {"name": "c", "deletionTimestamp": DELETED}},
    ]
    assert namespace_release.terminating(items, ()) == ["a", "c"]  # cluster-wide: all of them
    assert namespace_release.terminating(items, ("c", "x")) == ["c"]


def test_releases_only_deleted_objects_with_our_finalizer_and_keeps_the_others() -> None:
    objects = [
        {
            **obj("gone", True, [FINALIZER, "other/keep"]),
            "metadata": {**obj("gone", True, [FINALIZER, "other/keep"])["metadata"], "resourceVersion": "7"},
        },
        {
            **obj("alive", False, [FINALIZER]),
            "metadata": {**obj("alive", False, [FINALIZER])["metadata"], "resourceVersion": "8"},
        },
        {
            **obj("foreign", True, ["other/keep"]),
            "metadata": {**obj("foreign", True, ["other/keep"])["metadata"], "resourceVersion": "9"},
        },
    ]
    assert namespace_release.releases(objects, FINALIZER) == [
        ("gone", {"metadata": {"finalizers": ["other/keep"], "resourceVersion": "7"}})
    ]


class Memo:
    def __init__(self) -> None:
        self.trainjob = ControllerRuntime()


def test_sweep_releases_the_finalizer_and_tells_the_controller(apiserver) -> None:
    apiserver.put(
        "/api/v1/namespaces/doomed",
        {"metadata": {"name": "doomed", "deletionTimestamp": DELETED}, "status": {"phase": "Terminating"}},
    )
    apiserver.put("/api/v1/namespaces/fine", {"metadata": {"name": "fine"}, "status": {"phase": "Active"}})
    job = "/apis/lmforge.dev/v1alpha1/namespaces/doomed/trainjobs/tj"
    apiserver.put(job, obj("tj", True, [FINALIZER]))
    untouched = "/apis/lmforge.dev/v1alpha1/namespaces/fine/trainjobs/tj"
    apiserver.put(
        untouched,
        {
            "metadata": {
                "name": "tj",
                "namespace": "fine",
                "deletionTimestamp": DELETED,
                "finalizers": [FINALIZER],
            }
        },
    )
    memo = Memo()

    async def sweep() -> list:
        api = KubeApi(Configuration(host=apiserver.url))
        try:
            return await namespace_release.sweep_once(api, memo, (), FINALIZER, logging.getLogger("test"))
        finally:
            await api.close()

    assert asyncio.run(sweep()) == [("doomed", "trainjobs", "tj")]
    assert apiserver.objects[job]["metadata"]["finalizers"] == []
    assert apiserver.objects[untouched]["metadata"]["finalizers"] == [
        FINALIZER
    ]  # kopf handles live namespaces
    assert memo.trainjob.released == {("doomed", "tj")}
