"""Pod spec -> process: env resolution, $(VAR) expansion, mount and DNS rewrites, 0.0.0.0."""

from __future__ import annotations

import json

import pytest

from lmforge.devcluster.node.podspec import (
    PodContext,
    SpecError,
    bind_mountable,
    expand,
    mentions,
    pod_dns_names,
    process_spec,
    rewrite,
    with_bind_mounts,
)

POD = {
    "metadata": {
        "name": "job-0",
        "namespace": "ml",
        "uid": "u1",
        "labels": {"a": "1"},
        "annotations": {"note": "x"},
    },
    "spec": {"hostname": "job-0", "subdomain": "job", "nodeName": "lmforge-local"},
}


def ctx(**overrides) -> PodContext:
    base = dict(
        pod=POD,
        pod_ip="127.0.1.2",
        config_maps={"cm": {"k": "v", "x": "y"}},
        secrets={"s": {"pw": "hunter2"}},
        mount_map={"/etc/lmforge": "/tmp/pod/volumes/cfg"},
        dns={"job-0.job": "127.0.1.2"},
        base_env={"PATH": "/venv/bin:/usr/bin", "HOME": "/root"},
    )
    base.update(overrides)
    return PodContext(**base)


@pytest.mark.parametrize(
    "text,env,want",
    [
        ("$(A)-$(B)", {"A": "1"}, "1-$(B)"),
        ("$$(A)", {"A": "1"}, "$(A)"),
        ("plain", {}, "plain"),
    ],
    ids=["defined-and-undefined", "escaped", "no-vars"],
)
def test_expand(text, env, want):
    assert expand(text, env) == want


def test_process_spec_env_args_and_rewrites():
    container = {
        "name": "trainer",
        "command": ["torchrun", "--master-addr", "job-0.job", "--config", "/etc/lmforge/train.json"],
        "args": ["--host", "0.0.0.0", "--name=$(POD_NAME)"],
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "MASTER_ADDR", "value": "job-0.job"},
            {"name": "CONFIG", "value": "/etc/lmforge/train.json"},
            {"name": "GREETING", "value": "hi $(POD_NAME)"},
        ],
        "resources": {"limits": {"cpu": "1500m"}},
    }
    spec = process_spec(container, ctx())
    assert spec.argv == (
        "torchrun",
        "--master-addr",
        "127.0.1.2",
        "--config",
        "/tmp/pod/volumes/cfg/train.json",
        "--host",
        "127.0.1.2",
        "--name=job-0",
    )
    env = spec.env
    assert {
        k: env[k]
        for k in (
            "CM_k",
            "CM_x",
            "POD_NAME",
            "POD_IP",
            "NOTE",
            "PW",
            "MASTER_ADDR",
            "CONFIG",
            "GREETING",
            "OMP_NUM_THREADS",
            "HOME",
            "PATH",
        )
    } == {
        "CM_k": "v",
        "CM_x": "y",
        "POD_NAME": "job-0",
        "POD_IP": "127.0.1.2",
        "NOTE": "x",
        "PW": "hunter2",
        "MASTER_ADDR": "127.0.1.2",
        "CONFIG": "/tmp/pod/volumes/cfg/train.json",
        "GREETING": "hi job-0",
        "OMP_NUM_THREADS": "2",
        "HOME": "/root",
        "PATH": "/venv/bin:/usr/bin",
    }
    assert json.loads(env["LMFORGE_MOUNT_MAP"]) == {"/etc/lmforge": "/tmp/pod/volumes/cfg"}


def test_missing_config_map_key_is_a_spec_error():
    container = {
        "name": "c",
        "command": ["true"],
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nope"}}}],
    }
    with pytest.raises(SpecError) as error:
        process_spec(container, ctx())
    assert error.value.reason == "CreateContainerConfigError"


def test_container_without_command_cannot_run():
    with pytest.raises(SpecError):
        process_spec({"name": "c", "image": "nginx"}, ctx())


@pytest.mark.parametrize(
    "text,want",
    [
        ("/etc/lmforge", "/L"),
        ("--config=/etc/lmforge/a.json", "--config=/L/a.json"),
        ("/foo/etc/lmforge/a", "/foo/etc/lmforge/a"),
        ("/etc/lmforge-other", "/etc/lmforge-other"),
        ("http://svc.ns.svc.cluster.local:80/v1", "http://127.0.0.9:80/v1"),
        ("svc.ns.svc.cluster.local.evil", "svc.ns.svc.cluster.local.evil"),
    ],
    ids=["exact", "in-flag", "not-a-prefix", "not-a-sibling", "url-host", "longer-name"],
)
def test_rewrite(text, want):
    assert rewrite(text, {"/etc/lmforge": "/L"}, {"svc.ns.svc.cluster.local": "127.0.0.9"}) == want


def test_dns_names_and_mentions():
    assert pod_dns_names(POD) == [
        "job-0.job",
        "job-0.job.ml",
        "job-0.job.ml.svc",
        "job-0.job.ml.svc.cluster.local",
    ]
    container = {"command": ["torchrun", "--master-addr", "job-0.job"], "env": [{"name": "A", "value": "x"}]}
    assert mentions(container, {"job-0.job", "job-1.job"}) == {"job-0.job"}


def test_bind_mounts_only_under_run():
    mounts = {
        "/etc/lmforge": "/p/cfg",
        "/var/run/secrets/kubernetes.io/serviceaccount": "/p/sa",
        "/data": "/data",
    }
    assert bind_mountable(mounts) == {"/var/run/secrets/kubernetes.io/serviceaccount": "/p/sa"}
    argv = with_bind_mounts(("python", "x.py"), {"/run/a": "/p/a"})
    assert argv[:5] == ("unshare", "--mount", "--propagation", "private", "--") and argv[-2:] == (
        "python",
        "x.py",
    )
    assert with_bind_mounts(("true",), {}) == ("true",)
