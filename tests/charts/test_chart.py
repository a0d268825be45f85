"""The Helm chart rendered by the real `helm template`: operator Deployment, least-privilege RBAC
(the exact grants, cluster-wide and per namespace), schema errors, optional objects; plus the
files that need no helm (CRD copies, dashboard, kube-state-metrics config)."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lmforge"
Grant = tuple[str, str, str, str]  # (apiGroup, resource, verb, resourceName or "")

# What the controllers and kopf call (charts/lmforge/README.md, "RBAC", says why for each).
NAMESPACED: dict[tuple[str, str], str] = {
    ("lmforge.dev", "trainjobs"): "get list watch patch delete",
    ("lmforge.dev", "trainjobs/status"): "update",
    ("lmforge.dev", "inferenceservices"): "get list watch create patch",
    ("lmforge.dev", "inferenceservices/status"): "update",
    ("lmforge.dev", "quantizejobs"): "get list watch patch",
    ("lmforge.dev", "quantizejobs/status"): "update",
    ("batch", "jobs"): "list watch create",
    ("", "pods"): "list watch create delete deletecollection",
    ("", "services"): "create patch delete",
    ("", "configmaps"): "create patch delete",
    ("apps", "deployments"): "list watch create patch",
    ("apps", "deployments/scale"): "patch",
    ("policy", "poddisruptionbudgets"): "create patch delete",
    ("", "events"): "create",
}
DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): "list watch"}


def grants(table: dict[tuple[str, str], str], named: dict[tuple[str, str], tuple[str, str]] | None = None) -> set[Grant]:
    out = {(group, resource, verb, "") for (group, resource), verbs in table.items() for verb in verbs.split()}
    for (group, resource), (verbs, name) in (named or {}).items():
        out |= {(group, resource, verb, name) for verb in verbs.split()}
    return out


def rule_grants(rules: list[dict[str, Any]]) -> set[Grant]:
    return {(group, resource, verb, name)
            for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"] for name in (rule.get("resourceNames") or [""])}


EXPECTED_CLUSTER_WIDE = grants({**NAMESPACED, **DISCOVERY,
                                ("kopf.dev", "clusterkopfpeerings"): "list watch create"},
                               {("kopf.dev", "clusterkopfpeerings"): ("get patch", "lmforge")})
EXPECTED_PER_NAMESPACE = grants({**NAMESPACED, ("kopf.dev", "kopfpeerings"): "list watch create"},
                                {("kopf.dev", "kopfpeerings"): ("get patch", "lmforge")})
EXPECTED_NAMESPACED_CLUSTER_PART = grants({**DISCOVERY, ("", "namespaces"): "list watch"})


def find(objects: list[dict[str, Any]], kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: list[dict[str, Any]], kind: str, namespace: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, namespace)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# --- files ---------------------------------------------------------------------------------------


def test_chart_crds_are_the_generated_crds() -> None:
    """`make chart-crds` copies crds/*.yaml into the chart; a stale copy fails here."""
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == generated
    match, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", generated, shallow=False)
    assert not mismatch and not errors, f"run `make chart-crds`: {mismatch + errors} differ"
    assert "kopf-peering.yaml" in match


def test_values_yaml_keys_are_all_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                "vllm:e2e_request_latency_seconds_bucket", "vllm:generation_tokens_total"}


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "files" / "dashboards" / "lmforge.json").read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_shows_the_serving_metrics_per_inferenceservice() -> None:
    dashboard = _dashboard()
    exprs = _exprs(dashboard)
    used = {m for e in exprs for m in re.findall(r"vllm:[a-z0-9_]+", e)}
    assert VLLM_METRICS <= used
    for expr in exprs:
        if "vllm:" in expr:
            assert 'inferenceservice=~"$inferenceservice"' in expr and "by (namespace, inferenceservice" in expr, expr
    quantiles = {(m, q) for e in exprs for q, m in re.findall(r"histogram_quantile\((0\.\d+), .*?(vllm:\w+)_bucket", e)}
    for metric in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        assert {(metric, "0.5"), (metric, "0.99")} <= quantiles
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Request rate", "Queue depth", "KV cache usage", "Replicas", "Training loss", "Progress"} <= titles


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area


def test_trainjob_panels_use_exactly_the_metrics_the_kube_state_metrics_config_defines() -> None:
    config = yaml.safe_load((CHART / "files" / "kube-state-metrics" / "trainjob.yaml").read_text())
    (resource,) = config["spec"]["resources"]
    assert resource["groupVersionKind"] == {"group": "lmforge.dev", "version": "v1alpha1", "kind": "TrainJob"}
    defined = {f"{resource['metricNamePrefix']}_{m['name']}" for m in resource["metrics"]}
    used = {m for e in _exprs(_dashboard()) for m in re.findall(r"lmforge_trainjob_[a-z_]+", e)}
    assert used and used <= defined
    crd = (ROOT / "crds" / "lmforge.dev_trainjobs.yaml").read_text()
    for metric in resource["metrics"]:  # every path names a status field the CRD declares
        spec = metric["each"]
        path = (spec.get("gauge") or spec.get("stateSet"))["path"]
        assert path[0] == "status" and all(f"{field}:" in crd for field in path[1:]), path


# --- rendered ------------------------------------------------------------------------------------


def test_default_install_is_cluster_wide_with_exactly_the_expected_grants(render) -> None:
    objects = render()
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    assert rule_grants(role["rules"]) == EXPECTED_CLUSTER_WIDE
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount", "lmforge-system")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "lmforge-system"}]


def test_no_wildcards_and_no_secrets_anywhere(render) -> None:
    for objects in (render(), render("watchNamespaces={a,b}", "workerServiceAccount.name=lmforge-worker")):
        for role in find(objects, "ClusterRole") + find(objects, "Role"):
            for group, resource, verb, _ in rule_grants(role["rules"]):
                assert "*" not in (group + resource + verb), role["metadata"]["name"]
                assert resource not in {"secrets", "clusterroles", "roles", "rolebindings", "clusterrolebindings",
                                        "serviceaccounts", "nodes"}, (role["metadata"]["name"], resource)
                assert verb not in {"escalate", "bind", "impersonate"}


def test_watch_namespaces_gives_a_role_per_namespace_and_only_discovery_cluster_wide(render) -> None:
    objects = render("watchNamespaces={team-a,team-b}")
    (cluster_role,) = find(objects, "ClusterRole")
    assert rule_grants(cluster_role["rules"]) == EXPECTED_NAMESPACED_CLUSTER_PART
    for namespace in ("team-a", "team-b"):
        role = one(objects, "Role", namespace)
        assert rule_grants(role["rules"]) == EXPECTED_PER_NAMESPACE
        binding = one(objects, "RoleBinding", namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"][0]["namespace"] == "lmforge-system"
    args = container(objects)["args"]
    assert args[-4:] == ["-n", "team-a", "-n", "team-b"]


def test_operator_deployment(render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    assert deployment["spec"]["replicas"] == 2
    assert c["command"] == ["lmforge"]
    assert c["args"] == ["operator", "run", "--peering", "lmforge", "--liveness-port", "8080"]
    assert c["image"] == "ghcr.io/lmforge/operator:0.1.0"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["LMFORGE_RUNTIME_IMAGE"] == "ghcr.io/lmforge/runtime:0.1.0"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "LMFORGE_WORKER_SERVICE_ACCOUNT" not in env
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "privileged": False, "capabilities": {"drop": ["ALL"]}}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert set(c["resources"]) == {"requests", "limits"}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert "podAntiAffinity" in pod["affinity"]


@pytest.mark.parametrize("values", [(), ("watchNamespaces={a,b}", "verbose=true"), ("peering.standalone=true", "replicaCount=1")],
                         ids=["default", "namespaced", "standalone"])
def test_rendered_command_is_accepted_by_the_real_cli(render, values) -> None:
    from lmforge.cli import build_parser

    c = container(render(*values))
    assert c["command"] == ["lmforge"]
    args = build_parser().parse_args(c["args"])
    assert (args.command, args.operator_command, args.liveness_port) == ("operator", "run", 8080)
    assert args.namespace == (["a", "b"] if "watchNamespaces={a,b}" in values else [])


def test_values_reach_the_deployment(render) -> None:
    objects = render("replicaCount=1", "runtimeImage.tag=dev", "image.repository=reg.local/op", "image.tag=x",
                     "nodeSelector.pool=system", "tolerations[0].key=dedicated", "tolerations[0].operator=Exists",
                     "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                     ".matchExpressions[0].key=pool",
                     "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                     ".matchExpressions[0].operator=Exists",
                     "workerServiceAccount.name=trainer", "verbose=true", "peering.name=team-x")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "reg.local/op:x"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LMFORGE_RUNTIME_IMAGE"] == "ghcr.io/lmforge/runtime:dev"
    assert env["LMFORGE_WORKER_SERVICE_ACCOUNT"] == "trainer"
    assert c["args"] == ["operator", "run", "--peering", "team-x", "--liveness-port", "8080", "--verbose"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert list(pod["affinity"]) == ["nodeAffinity"]
    assert ("kopf.dev", "clusterkopfpeerings", "patch", "team-x") in rule_grants(one(objects, "ClusterRole")["rules"])


def test_model_cache_is_opt_in(render) -> None:
    def env(*values: str) -> dict[str, str | None]:
        return {e["name"]: e.get("value") for e in container(render(*values))["env"]}

    assert "LMFORGE_MODEL_CACHE_HOSTPATH" not in env()
    on = env("modelCache.enabled=true", "modelCache.maxSize=200Gi")
    assert (on["LMFORGE_MODEL_CACHE_HOSTPATH"], on["LMFORGE_MODEL_CACHE_MAX_SIZE"]) == (
        "/var/lib/lmforge/model-cache", "200Gi")
    from lmforge.operator.builders.storage import ModelCache, model_cache_from_env

    assert model_cache_from_env(on) == ModelCache("/var/lib/lmforge/model-cache", "200Gi")  # type: ignore[arg-type]


def test_standalone_has_no_peering_and_refuses_two_replicas(render, helm) -> None:
    objects = render("peering.standalone=true", "replicaCount=1")
    assert container(objects)["args"] == ["operator", "run", "--standalone", "--liveness-port", "8080"]
    assert not any(g[0] == "kopf.dev" for g in rule_grants(one(objects, "ClusterRole")["rules"]))
    failed = helm("template", "x", str(CHART), "--set", "peering.standalone=true", check=False)
    assert failed.returncode != 0 and "set replicaCount to 1" in failed.stderr


def test_worker_service_account_in_each_watched_namespace(render) -> None:
    objects = render("watchNamespaces={a,b}", "workerServiceAccount.name=trainer")
    for namespace in ("a", "b"):
        roles = {r["metadata"]["name"]: r for r in find(objects, "Role", namespace)}
        assert roles["trainer"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
        assert [sa["metadata"]["name"] for sa in find(objects, "ServiceAccount", namespace)] == ["trainer"]
    assert not find(render("workerServiceAccount.name=trainer"), "Role")  # cluster-wide: documented, not created


def test_service_monitor_and_dashboards_behind_flags(render) -> None:
    assert not find(render(), "ServiceMonitor") and not find(render(), "ConfigMap")
    objects = render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=kps", "dashboards.enabled=true",
                     "dashboards.namespace=monitoring")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchLabels"]["lmforge.dev/kind"] == "InferenceService"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    config_map = one(objects, "ConfigMap", "monitoring")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["lmforge.json"]) == _dashboard()
    scoped = one(render("serviceMonitor.enabled=true", "watchNamespaces={a}"), "ServiceMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a"]}


@pytest.mark.parametrize(("value", "message"), [
    ("replicaCount=-1", "at '/replicaCount': minimum: got -1, want 1"),
    ("replicaCount=two", "at '/replicaCount': got string, want integer"),
    ("watchNamespaces[0]=Not_A_Namespace", "at '/watchNamespaces/0'"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
    ("replicaCont=2", "additional properties 'replicaCont' not allowed"),
    ("serviceMonitor.enabled=yes", "at '/serviceMonitor/enabled': got string, want boolean"),
    ("modelCache.maxSize=lots", "at '/modelCache/maxSize'"),
], ids=["negative-replicas", "replicas-string", "bad-namespace", "pull-policy", "typo", "flag-string",
        "cache-size"])
def test_schema_rejects_bad_values_with_the_path(helm, value: str, message: str) -> None:
    result = helm("template", "x", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and message in result.stderr


def test_helm_lint_is_clean(helm) -> None:
    for extra in ([], ["--set", "watchNamespaces={a}", "--set", "serviceMonitor.enabled=true",
                       "--set", "dashboards.enabled=true"]):
        out = helm("lint", "--strict", str(CHART), *extra).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out
        assert "[WARNING]" not in out and "[ERROR]" not in out
