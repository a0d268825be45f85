"""`up`, `down`, `reset` and `status` of one local cluster, identified by its state dir.

The state dir holds everything of one cluster (pki/, logs/, etcd-data/, kubeconfigs/,
state.json with the pids and ports we started), so clusters in different dirs never collide and
`down` never has to guess what to stop. A file lock serializes commands on the same dir.

Data is never deleted behind the user's back: `up` keeps etcd-data/ (a cluster that is partly up
gets only its dead components restarted, on the same ports), `down` stops processes, and `reset`
is the one command that wipes. A supervisor process (supervisor.py) restarts a component that
exits while the cluster is up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.devcluster.cluster import build, certs, health, nodes, paths, processes
from lmforge.devcluster.cluster.build import BinPaths, BuildError, ensure_binaries
from lmforge.devcluster.cluster.certs import CertError
from lmforge.devcluster.cluster.components import (
    PORT_COUNT,
    Component,
    Layout,
    Ports,
    apiserver_url,
    components,
)
from lmforge.devcluster.cluster.kubeconfig import render_kubeconfig, write_kubeconfig
from lmforge.devcluster.cluster.locking import file_lock

NUM_NODES = 4
START_TIMEOUT_S = {"etcd": 30.0, "kube-apiserver": 90.0}  # others: DEFAULT_START_TIMEOUT_S
DEFAULT_START_TIMEOUT_S = 60.0
NODES_READY_TIMEOUT_S = 90.0
Log = Callable[[str], None]


class ClusterError(RuntimeError):
    """A step of up/down failed; the message names the step and carries the relevant log tail."""


@dataclass(frozen=True)
class ClusterInfo:
    """What callers need to talk to a running cluster."""

    state_dir: Path
    kubeconfig: Path
    apiserver_url: str
    bins: BinPaths
    already_running: bool = False

    @property
    def bin_dir(self) -> Path:
        return self.bins.bin_dir

    @property
    def kubectl(self) -> Path:
        return self.bins.kubectl

    @property
    def helm(self) -> Path:
        return self.bins.helm

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for subprocesses: KUBECONFIG set, our kubectl/helm first on PATH, and their
        caches/config in the state dir (nothing written to ~/.kube or ~/.config/helm)."""
        env = dict(os.environ if base is None else base)
        env.update(client_env(self.state_dir))
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env


def client_env(state_dir: Path) -> dict[str, str]:
    return {
        "KUBECACHEDIR": str(state_dir / "client" / "kube-cache"),
        "HELM_CACHE_HOME": str(state_dir / "client" / "helm" / "cache"),
        "HELM_CONFIG_HOME": str(state_dir / "client" / "helm" / "config"),
        "HELM_DATA_HOME": str(state_dir / "client" / "helm" / "data"),
    }


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int
    alive: bool
    healthy: bool
    ports: tuple[int, ...]
    log: str


@dataclass(frozen=True)
class ClusterStatus:
    state_dir: Path
    kubeconfig: Path | None = None
    apiserver_url: str | None = None
    components: tuple[ComponentStatus, ...] = field(default=())
    ready: bool = False  # `up` got to the end (nodes registered and Ready)

    @property
    def running(self) -> bool:
        return self.ready and bool(self.components) and all(c.alive and c.healthy for c in self.components)

    @property
    def any_alive(self) -> bool:
        return any(c.alive for c in self.components)


def layout_for(state_dir: Path | str | None) -> Layout:
    directory = Path(state_dir).expanduser().resolve() if state_dir else paths.default_state_dir().resolve()
    return Layout(directory, paths.kubeconfig_path(directory))


def up(
    state_dir: Path | str | None = None, num_nodes: int = NUM_NODES, log: Log | None = None
) -> ClusterInfo:
    """Start the cluster (building binaries first if needed) and return once every node is
    schedulable and the default service account exists. Already up: returns at once."""
    log = log or _stderr
    layout = layout_for(state_dir)
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(layout.lock_file):
        state = read_state(layout)
        if state:
            current = _status(layout, state)
            if current.running:
                if not _supervisor_alive(state):
                    _start_supervisor(layout, state, log)
                log(f"cluster in {layout.state_dir} is already up")
                return _info(layout, state, already_running=True)
            if current.any_alive and current.ready:
                return _repair(layout, state, current, num_nodes, log)
            _stop_all(layout, state, log)
        try:
            bins = ensure_binaries(log=log)
            pki = certs.ensure_pki(layout.pki.directory)
        except (BuildError, CertError) as error:
            raise ClusterError(str(error)) from None
        return _start(layout, bins, pki, num_nodes, log)


def _repair(layout: Layout, state: dict, current: ClusterStatus, num_nodes: int, log: Log) -> ClusterInfo:
    """Restart only the components that are down, on their recorded ports, keeping etcd's data."""
    dead = [c.name for c in current.components if not c.alive]
    log(
        f"cluster is only partly up: restarting {', '.join(dead) or 'nothing (waiting for the unhealthy ones)'}; "
        f"etcd data in {layout.etcd_data} is kept (`lmforge cluster reset` deletes it)"
    )
    pki = certs.ensure_pki(layout.pki.directory)
    bins = BinPaths(Path(state["bin_dir"]))
    by_name = {c.name: c for c in components(bins, layout, Ports(**state["ports"]))}
    try:
        for entry in state["processes"]:
            process = processes.Process.from_dict(entry)
            if not processes.is_alive(process):
                processes.reap(process.pid)
                log(f"restarting {entry['name']}")
                process = restart_component(layout, state, entry["name"])
            _wait_healthy(by_name[entry["name"]], process, pki)
        _wait_nodes(bins, layout, num_nodes)
    except (OSError, subprocess.SubprocessError) as error:
        raise ClusterError(str(error)) from None
    if not _supervisor_alive(state):
        _start_supervisor(layout, state, log)
    log(f"cluster up again: {state['apiserver']}")
    return _info(layout, state)


def restart_component(layout: Layout, state: dict, name: str) -> processes.Process:
    """Start component `name` again with the argv, env and ports it was started with (state.json's
    ports; the argv is rebuilt from them) and record its new pid. The caller holds the lock."""
    bins = BinPaths(Path(state["bin_dir"]))
    component = next(c for c in components(bins, layout, Ports(**state["ports"])) if c.name == name)
    env = dict(os.environ, **dict(component.env))
    process = replace(
        processes.start(component.name, list(component.argv), layout.logs, env), ports=component.ports
    )
    entry = next(e for e in state["processes"] if e["name"] == name)
    entry.update(process.to_dict())
    _write_state(layout, state)
    return process


def reset(state_dir: Path | str | None = None, log: Log | None = None) -> bool:
    """Stop the cluster and delete its etcd data (every namespace, CRD and object). True if there
    was data to delete. The only command that wipes; the CLI asks first (or needs --yes)."""
    log = log or _stderr
    layout = layout_for(state_dir)
    with file_lock(layout.lock_file):
        state = read_state(layout)
        if state:
            _stop_all(layout, state, log)
        existed = layout.etcd_data.exists()
        shutil.rmtree(layout.etcd_data, ignore_errors=True)
    log(
        f"deleted the cluster data in {layout.etcd_data}"
        if existed
        else f"no cluster data in {layout.etcd_data}"
    )
    return existed


def _supervisor_alive(state: dict) -> bool:
    data = state.get("supervisor")
    return data is not None and bool(data) and processes.is_alive(processes.Process.from_dict(data))


def _start_supervisor(layout: Layout, state: dict, log: Log) -> None:
    from lmforge.devcluster.cluster.supervisor import MODULE

    process = processes.start(
        "supervisor", [sys.executable, "-P", "-m", MODULE, str(layout.state_dir)], layout.logs
    )
    state["supervisor"] = process.to_dict()
    _write_state(layout, state)
    log(f"supervisor started (pid {process.pid}): it restarts a component that exits; log {process.log}")


def down(state_dir: Path | str | None = None, log: Log | None = None) -> bool:
    """Stop every process recorded in the state dir. True if something was running."""
    log = log or _stderr
    layout = layout_for(state_dir)
    if not layout.state_file.exists():
        log(f"no cluster running in {layout.state_dir}")
        return False
    with file_lock(layout.lock_file):
        state = read_state(layout)
        if not state:
            return False
        _stop_all(layout, state, log)
        log(f"cluster in {layout.state_dir} stopped")
        return True


def status(state_dir: Path | str | None = None) -> ClusterStatus:
    layout = layout_for(state_dir)
    state = read_state(layout)
    return _status(layout, state) if state else ClusterStatus(layout.state_dir)


def _start(layout: Layout, bins: BinPaths, pki: certs.Pki, num_nodes: int, log: Log) -> ClusterInfo:
    started_at = time.monotonic()
    ports = Ports.from_list(_pick_ports(layout))
    url = apiserver_url(ports)
    _write_kubeconfigs(layout, pki, url)
    if layout.etcd_data.exists():  # never wiped here: `lmforge cluster reset` does that
        log(f"keeping the cluster data in {layout.etcd_data} (`lmforge cluster reset` deletes it)")
    state: dict[str, Any] = {
        "apiserver": url,
        "kubeconfig": str(layout.admin_kubeconfig),
        "bin_dir": str(bins.bin_dir),
        "ports": ports.__dict__,
        "processes": [],
    }
    try:
        for component in components(bins, layout, ports):
            log(f"starting {component.name}")
            env = dict(os.environ, **dict(component.env))
            process = replace(
                processes.start(component.name, list(component.argv), layout.logs, env), ports=component.ports
            )
            state["processes"].append(
                {
                    **process.to_dict(),
                    "health_url": component.health_url,
                    "verify_with_ca": component.verify_with_ca,
                }
            )
            _write_state(layout, state)  # recorded before waiting: a failed start is still stoppable
            _wait_healthy(component, process, pki)
        log(f"registering {num_nodes} kwok nodes")
        _kubectl(bins, layout, "apply", "-f", "-", input=json.dumps(nodes.node_list(num_nodes)))
        _wait_nodes(bins, layout, num_nodes)
        _poll(
            lambda: (
                _kubectl(
                    bins, layout, "get", "serviceaccount", "default", "-n", "default", check=False
                ).returncode
                == 0
            ),
            30.0,
            "the default service account was not created (see logs/kube-controller-manager.log)",
        )
    except BaseException as error:  # Ctrl-C included: never leave half a cluster behind
        log("start failed: stopping what was started")
        _stop_all(layout, state, log)
        if isinstance(error, (ClusterError, OSError, subprocess.SubprocessError)):
            raise ClusterError(str(error)) from None
        raise
    state["ready"] = True
    _write_state(layout, state)
    _start_supervisor(layout, state, log)
    log(f"cluster up in {time.monotonic() - started_at:.1f} s: {url}, {num_nodes} nodes")
    return _info(layout, state)


def _pick_ports(layout: Layout) -> list[int]:
    """Reuse the last ports when they are all free (a kubeconfig copied elsewhere keeps working)."""
    previous = layout.state_dir / "ports.json"
    try:
        ports = json.loads(previous.read_text())
        if len(ports) == PORT_COUNT and not set(ports) & processes.listening_ports():
            return ports
    except (OSError, ValueError):
        pass
    ports = processes.pick_free_ports(PORT_COUNT)
    previous.write_text(json.dumps(ports))
    return ports


def _write_kubeconfigs(layout: Layout, pki: certs.Pki, url: str) -> None:
    def render(identity: str) -> dict:
        return render_kubeconfig(
            url,
            pki.ca_cert.read_bytes(),
            pki.client_cert(identity).read_bytes(),
            pki.client_key(identity).read_bytes(),
            user=identity,
        )

    write_kubeconfig(layout.admin_kubeconfig, render("admin"))
    write_kubeconfig(layout.component_kubeconfig("kwok"), render("admin"))  # kwok plays every kubelet
    for identity in ("kube-controller-manager", "kube-scheduler"):
        write_kubeconfig(layout.component_kubeconfig(identity), render(identity))


def _wait_healthy(component: Component, process: processes.Process, pki: certs.Pki) -> None:
    context = health.context_for(component.health_url, pki, component.verify_with_ca)
    timeout = START_TIMEOUT_S.get(component.name, DEFAULT_START_TIMEOUT_S)
    deadline = time.monotonic() + timeout
    while not health.is_healthy(component.health_url, context):
        if not processes.is_alive(process):
            raise ClusterError(
                f"{component.name} exited while starting; last lines of {process.log}:\n"
                f"{build.tail(Path(process.log))}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{component.name} not healthy at {component.health_url} after {timeout:.0f} s; "
                f"last lines of {process.log}:\n{build.tail(Path(process.log))}"
            )
        time.sleep(0.2)


def _wait_nodes(bins: BinPaths, layout: Layout, count: int) -> None:
    def all_schedulable() -> bool:
        result = _kubectl(bins, layout, "get", "nodes", "-o", "json", check=False)
        items = json.loads(result.stdout).get("items", []) if result.returncode == 0 else []
        return sum(nodes.is_schedulable(n) for n in items) >= count

    _poll(
        all_schedulable,
        NODES_READY_TIMEOUT_S,
        f"nodes not Ready after {NODES_READY_TIMEOUT_S:.0f} s; last lines of logs/kwok.log:\n"
        + build.tail(layout.logs / "kwok.log"),
    )


def _poll(predicate: Callable[[], bool], timeout: float, message: str) -> None:
    if not processes.wait_until(predicate, timeout, interval=0.25):
        raise ClusterError(message)


def _kubectl(
    bins: BinPaths, layout: Layout, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(bins.kubectl), f"--kubeconfig={layout.admin_kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **client_env(layout.state_dir)),
    )
    if check and result.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _stop_all(layout: Layout, state: dict, log: Log) -> None:
    """The supervisor first (it would restart what we stop), then reverse start order; then the
    recorded ports must be free, else we say which are not."""
    if state.get("supervisor"):
        processes.stop(processes.Process.from_dict(state["supervisor"]))
    recorded = [processes.Process.from_dict(p) for p in state.get("processes", [])]
    for process in reversed(recorded):
        if processes.is_alive(process):
            log(f"stopping {process.name} (pid {process.pid})")
        if not processes.stop(process):
            log(f"warning: {process.name} (pid {process.pid}) did not exit")
    ports = {port for p in recorded for port in p.ports}
    if not processes.wait_until(lambda: not ports & processes.listening_ports(), 10.0):
        log(f"warning: still listening after stop: ports {sorted(ports & processes.listening_ports())}")
    layout.state_file.unlink(missing_ok=True)


def _status(layout: Layout, state: dict) -> ClusterStatus:
    pki = layout.pki
    result = []
    for data in state.get("processes", []):
        process = processes.Process.from_dict(data)
        alive = processes.is_alive(process)
        context = health.context_for(data["health_url"], pki, data.get("verify_with_ca", False))
        healthy = alive and health.is_healthy(data["health_url"], context)
        result.append(ComponentStatus(process.name, process.pid, alive, healthy, process.ports, process.log))
    return ClusterStatus(
        layout.state_dir,
        Path(state["kubeconfig"]),
        state["apiserver"],
        tuple(result),
        bool(state.get("ready")),
    )


def _info(layout: Layout, state: dict, already_running: bool = False) -> ClusterInfo:
    return ClusterInfo(
        layout.state_dir,
        Path(state["kubeconfig"]),
        state["apiserver"],
        BinPaths(Path(state["bin_dir"])),
        already_running,
    )


def read_state(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.state_file.read_text())
    except (OSError, ValueError):
        return None


def _write_state(layout: Layout, state: dict) -> None:
    tmp = layout.state_file.with_name("state.json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(layout.state_file)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
