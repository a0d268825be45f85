"""Command lines of the control plane and the simulated nodes."""

from pathlib import Path

from lmforge.devcluster.cluster import paths
from lmforge.devcluster.cluster.build import BinPaths
from lmforge.devcluster.cluster.components import Layout, Ports, components
from lmforge.devcluster.cluster.nodes import is_schedulable, node_list, node_manifest

PORTS = Ports(
    etcd_client=20001, etcd_peer=20002, apiserver=20003, controller_manager=20004, scheduler=20005, kwok=20006
)


def _components(tmp_path):
    layout = Layout(tmp_path / "state", tmp_path / "state" / "kubeconfig")
    return {c.name: c for c in components(BinPaths(Path("/bin-dir")), layout, PORTS)}


def test_start_order_and_binaries(tmp_path):
    by_name = _components(tmp_path)
    assert list(by_name) == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
    assert all(c.argv[0] == f"/bin-dir/{name}" for name, c in by_name.items())


def test_every_port_is_explicit_and_recorded(tmp_path):
    by_name = _components(tmp_path)
    recorded = sorted(p for c in by_name.values() for p in c.ports)
    assert recorded == sorted(PORTS.__dict__.values())
    assert "--secure-port=20003" in by_name["kube-apiserver"].argv
    assert "--secure-port=20004" in by_name["kube-controller-manager"].argv
    assert "--secure-port=20005" in by_name["kube-scheduler"].argv
    assert "--listen-peer-urls=http://127.0.0.1:20002" in by_name["etcd"].argv
    assert "--server-address=127.0.0.1:20006" in by_name["kwok"].argv


def test_no_file_outside_the_state_dir(tmp_path):
    """Two clusters must never share a file: every path flag points into the state dir."""
    for component in _components(tmp_path).values():
        for arg in component.argv[1:]:
            value = arg.split("=", 1)[-1]
            if value.startswith("/") and not value.endswith("stages.yaml") and value != "/registry":
                assert Path(value).is_relative_to(tmp_path / "state"), arg
    assert dict(_components(tmp_path)["kwok"].env)["KWOK_WORKDIR"] == str(tmp_path / "state" / "kwok")


def test_apiserver_security_flags(tmp_path):
    argv = _components(tmp_path)["kube-apiserver"].argv
    assert "--authorization-mode=Node,RBAC" in argv
    assert any(a.startswith("--service-account-signing-key-file=") for a in argv)
    assert any(a.startswith("--client-ca-file=") for a in argv)


def test_default_and_custom_state_dirs_get_different_kubeconfigs(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(paths.CLUSTER_DIR_ENV, raising=False)
    assert paths.kubeconfig_path(paths.default_state_dir()) == tmp_path / "cache" / "kubeconfig"
    assert paths.kubeconfig_path(tmp_path / "other") == tmp_path / "other" / "kubeconfig"
    monkeypatch.setenv(paths.CLUSTER_DIR_ENV, str(tmp_path / "env-dir"))
    assert paths.default_state_dir() == tmp_path / "env-dir"


def test_node_advertises_eight_gpus_and_is_managed_by_kwok():
    node = node_manifest(2)
    assert node["metadata"]["name"] == "kwok-node-2"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    for field in ("capacity", "allocatable"):
        assert node["status"][field]["nvidia.com/gpu"] == "8"
        assert {"cpu", "memory", "pods"} <= set(node["status"][field])
    assert [n["metadata"]["name"] for n in node_list(4)["items"]] == [f"kwok-node-{i}" for i in range(4)]


def test_schedulable_needs_ready_and_no_lifecycle_taint():
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert is_schedulable(ready)
    tainted = {**ready, "spec": {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}}
    assert not is_schedulable(tainted)
    assert not is_schedulable({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
