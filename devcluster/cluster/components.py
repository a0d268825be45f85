"""The command line of every control-plane process, as a pure function of where things are.

Flags follow kwokctl's binary runtime (pkg/kwokctl/components) and kubeadm's identities:
every listener is on 127.0.0.1 at a port picked for this cluster, every file is in the state dir
(nothing in /var/run/kubernetes, ~/.kube or ~/.kwok), so two clusters never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.devcluster.cluster.build import BinPaths
from lmforge.devcluster.cluster.certs import SERVICE_CLUSTER_IP_RANGE, Pki
from lmforge.devcluster.cluster.nodes import KWOK_NODE_ANNOTATION

STAGES_FILE = Path(__file__).parent / "stages.yaml"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
POD_CIDR = "10.0.0.0/16"
NODE_LEASE_SECONDS = 40
KUBE_API_QPS, KUBE_API_BURST = "100", "200"  # the operator benchmarks create many objects


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def from_list(cls, ports: list[int]) -> Ports:
        return cls(*ports)


PORT_COUNT = 6


@dataclass(frozen=True)
class Layout:
    """Files of one cluster under its state dir."""

    state_dir: Path
    admin_kubeconfig: Path

    pki = property(lambda self: Pki(self.state_dir / "pki"))
    logs = property(lambda self: self.state_dir / "logs")
    etcd_data = property(lambda self: self.state_dir / "etcd-data")
    kwok_workdir = property(lambda self: self.state_dir / "kwok")
    state_file = property(lambda self: self.state_dir / "state.json")
    lock_file = property(lambda self: self.state_dir / ".lock")

    def component_kubeconfig(self, identity: str) -> Path:
        return self.state_dir / "kubeconfigs" / f"{identity}.kubeconfig"


@dataclass(frozen=True)
class Component:
    name: str
    argv: tuple[str, ...]
    ports: tuple[int, ...]
    health_url: str  # 200 means healthy
    env: tuple[tuple[str, str], ...] = ()
    verify_with_ca: bool = False  # only the apiserver serves a cert from our CA


def apiserver_url(ports: Ports) -> str:
    return f"https://127.0.0.1:{ports.apiserver}"


def components(bins: BinPaths, layout: Layout, ports: Ports) -> list[Component]:
    """In start order; `down` stops them in reverse."""
    pki = layout.pki
    local = "127.0.0.1"
    etcd_url = f"http://{local}:{ports.etcd_client}"
    peer_url = f"http://{local}:{ports.etcd_peer}"
    return [
        Component(
            "etcd",
            (
                str(bins.etcd),
                "--name=lmforge",
                f"--data-dir={layout.etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=lmforge={peer_url}",
                "--initial-cluster-state=new",
                "--auto-compaction-retention=1",
                "--log-level=warn",
                "--unsafe-no-fsync=true",  # a throwaway dev cluster: fsync only slows tests down
            ),
            (ports.etcd_client, ports.etcd_peer),
            f"{etcd_url}/health",
        ),
        Component(
            "kube-apiserver",
            (
                str(bins.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--etcd-prefix=/registry",
                f"--bind-address={local}",
                f"--advertise-address={local}",
                f"--secure-port={ports.apiserver}",
                f"--cert-dir={layout.state_dir / 'apiserver'}",
                f"--tls-cert-file={pki.apiserver_cert}",
                f"--tls-private-key-file={pki.apiserver_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ),
            (ports.apiserver,),
            f"{apiserver_url(ports)}/readyz",
            verify_with_ca=True,
        ),
        Component(
            "kube-controller-manager",
            (
                str(bins.kube_controller_manager),
                *_client_flags(layout, "kube-controller-manager"),
                f"--bind-address={local}",
                f"--secure-port={ports.controller_manager}",
                f"--cert-dir={layout.state_dir / 'kube-controller-manager'}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.sa_key}",
                "--use-service-account-credentials=true",  # each controller under its own RBAC role
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                "--profiling=false",
            ),
            (ports.controller_manager,),
            f"https://{local}:{ports.controller_manager}/healthz",
        ),
        Component(
            "kube-scheduler",
            (
                str(bins.kube_scheduler),
                *_client_flags(layout, "kube-scheduler"),
                f"--bind-address={local}",
                f"--secure-port={ports.scheduler}",
                f"--cert-dir={layout.state_dir / 'kube-scheduler'}",
                "--leader-elect=false",
                "--profiling=false",
            ),
            (ports.scheduler,),
            f"https://{local}:{ports.scheduler}/healthz",
        ),
        Component(
            "kwok",
            (
                str(bins.kwok),
                f"--kubeconfig={layout.component_kubeconfig('kwok')}",
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION[0]}={KWOK_NODE_ANNOTATION[1]}",
                f"--node-ip={local}",
                f"--node-port={ports.kwok}",
                f"--server-address={local}:{ports.kwok}",
                f"--cidr={POD_CIDR}",
                f"--node-lease-duration-seconds={NODE_LEASE_SECONDS}",
            ),
            (ports.kwok,),
            f"http://{local}:{ports.kwok}/healthz",
            env=(("KWOK_WORKDIR", str(layout.kwok_workdir)),),
        ),  # never read ~/.kwok/kwok.yaml
    ]


def _client_flags(layout: Layout, identity: str) -> tuple[str, ...]:
    kubeconfig = layout.component_kubeconfig(identity)
    return (
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--kube-api-qps={KUBE_API_QPS}",
        f"--kube-api-burst={KUBE_API_BURST}",
    )
