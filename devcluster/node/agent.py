"""The node agent: registers the Node, keeps its Ready condition and Lease fresh, and runs every
pod bound to it (spec.nodeName) as local processes, reporting their status back.

State on disk, under `state_dir` (default <cache>/localnode):
    pods/<namespace>_<pod>_<uid8>/volumes/<volume>/     emptyDir, configMap, secret, projected files
    pods/<namespace>_<pod>_<uid8>/logs/<container>/<restart>.log, .../pid
    pods/<namespace>_<pod>_<uid8>/work/                 default working directory
    pvc/<namespace>/<claim>/                              persistentVolumeClaim volumes
    index.json                                            namespace/pod -> pod dir, pod IP (for the CLI)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmforge.devcluster.node import node as nodes
from lmforge.devcluster.node import podspec, podstatus, volumes
from lmforge.devcluster.node.container import Container
from lmforge.devcluster.node.kubelet import KubeletServer

TICK_S = 0.5
HEARTBEAT_S = 10.0
DNS_WAIT_S = 120.0  # how long a pod waits for a peer's name (e.g. <job>-0.<job>) before starting anyway
ENV_PASSTHROUGH = (
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "LMFORGE_CACHE_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
)
Log = Callable[[str], None]


class IpPool:
    """127.0.<x>.<y> loopback addresses (x 1..254, y 2..254), one per pod, reused lowest-first
    only after the pool wrapped, so a fresh pod rarely inherits a dying pod's address."""

    def __init__(self) -> None:
        self.used: dict[str, str] = {}
        self.next_index = 0

    def allocate(self, uid: str) -> str:
        if uid in self.used:
            return self.used[uid]
        taken = set(self.used.values())
        for _ in range(254 * 253):
            x, y = divmod(self.next_index % (254 * 253), 253)
            self.next_index += 1
            ip = f"127.0.{x + 1}.{y + 2}"
            if ip not in taken:
                self.used[uid] = ip
                return ip
        raise RuntimeError("no free pod IP")

    def reserve(self, uid: str, ip: str | None) -> None:
        """Keep the address of a pod from an earlier agent run (a finished pod still shows it)."""
        if ip and ip.startswith("127.0.") and ip not in self.used.values():
            self.used[uid] = ip

    def release(self, uid: str) -> None:
        self.used.pop(uid, None)


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    ip: str
    directory: Path
    pod: dict[str, Any]
    containers: list[Container] = field(default_factory=list)
    init_containers: list[Container] = field(default_factory=list)  # run one by one, before `containers`
    specs: list[podspec.ProcessSpec] = field(default_factory=list)  # of `containers`, started after init
    init_specs: list[podspec.ProcessSpec] = field(default_factory=list)
    main_started: bool = False
    started: bool = False  # volumes made, specs resolved: the first container is running
    start_time: str = ""
    transition_time: str = ""
    first_seen: float = field(default_factory=time.monotonic)
    waiting: tuple[str, str] | None = None  # (reason, message) while not started
    failed: tuple[str, str] | None = None  # could not start at all
    stopping: bool = False
    last_status: dict[str, Any] | None = None
    last_key: str = ""

    @property
    def restart_policy(self) -> str:
        return (self.pod.get("spec") or {}).get("restartPolicy", "Always")

    @property
    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]


def pod_dir_name(namespace: str, name: str, uid: str) -> str:
    return f"{namespace}_{name}_{uid[:8]}"


def venv_bin() -> Path:
    return Path(sys.executable).parent


class Agent:
    def __init__(
        self,
        kubeconfig: Path | str | None,
        state_dir: Path,
        node_name: str = nodes.NODE_NAME,
        kubelet_port: int = 0,
        log: Log | None = None,
    ) -> None:
        from kubernetes import client, config

        self.log = log or (lambda m: print(m, flush=True))
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None, client_configuration=configuration
        )
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        apiserver = urlparse(configuration.host)
        self.apiserver_host, self.apiserver_port = apiserver.hostname or "127.0.0.1", apiserver.port or 443
        self.runs: dict[str, PodRun] = {}
        self.ips = IpPool()
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.kubelet = KubeletServer(self._log_lookup, self.state_dir / "pki", port=kubelet_port)
        self.ready_since = nodes.now()
        self.bind_mounts = os.geteuid() == 0 and shutil.which("unshare") is not None

    # --- raw JSON helpers (camelCase dicts, as kubectl shows them) --------------------------------
    def _get_json(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = call(*args, _preload_content=False, **kwargs)
        return json.loads(response.data)

    def _optional(self, call: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self._get_json(call, *args)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    # --- node --------------------------------------------------------------------------------------
    def register(self) -> None:
        from kubernetes.client.rest import ApiException

        manifest = nodes.node_manifest(self.node_name)
        try:
            self.core.create_node(manifest)  # type: ignore[arg-type]  # the client sends a dict body as it is
            self.log(f"registered node {self.node_name}")
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_node(
                self.node_name,
                {
                    "metadata": {"labels": manifest["metadata"]["labels"]},
                    "spec": {"taints": manifest["spec"]["taints"]},
                },
            )
        self.heartbeat()

    def heartbeat(self, ready: bool = True) -> None:
        from kubernetes.client.rest import ApiException

        status = nodes.node_status(self.kubelet.port, ready=ready, transition_time=self.ready_since)
        body = self._get_json(self.core.patch_node_status, self.node_name, {"status": status})
        uid = body["metadata"]["uid"]
        lease = nodes.lease_manifest(self.node_name, uid, nodes.now_micro())
        try:
            self.coordination.patch_namespaced_lease(
                self.node_name, nodes.LEASE_NAMESPACE, {"spec": lease["spec"]}
            )
        except ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease(nodes.LEASE_NAMESPACE, lease)  # type: ignore[arg-type]  # the client sends a dict body as it is

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_S):
            try:
                self.heartbeat()
            except Exception as error:  # noqa: BLE001 - keep beating
                self.log(f"heartbeat failed: {error}")

    # --- main loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kubelet.start()
        self.register()
        self.log(
            f"node {self.node_name} Ready; kubelet API on https://127.0.0.1:{self.kubelet.port}; "
            f"pods under {self.state_dir / 'pods'}"
        )
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        try:
            while not self.stop_event.is_set():
                try:
                    self.sync()
                except Exception as error:  # noqa: BLE001 - a failed round is retried next tick
                    self.log(f"sync failed: {error!r}")
                self.stop_event.wait(TICK_S)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop_event.set()
        with self.lock:
            for run in self.runs.values():
                for container in run.all_containers:
                    container.stop(5.0)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                c.alive for r in self.runs.values() for c in r.all_containers
            ):
                for run in self.runs.values():
                    for container in run.all_containers:
                        container.tick()
                time.sleep(0.2)
        try:
            self.heartbeat(ready=False)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass
        self.kubelet.stop()

    def sync(self) -> None:
        listing = self._get_json(
            self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.node_name}"
        )
        seen = set()
        with self.lock:
            for pod in listing.get("items", []):
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                run = self.runs.get(uid)
                if run is None:
                    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and not pod[
                        "metadata"
                    ].get("deletionTimestamp"):
                        self.ips.reserve(uid, (pod.get("status") or {}).get("podIP"))
                        continue  # finished before this agent started: nothing to run
                    run = self._new_run(pod)
                run.pod = pod
                self._sync_pod(run)
            for uid in [u for u in self.runs if u not in seen]:  # force-deleted: kill now
                run = self.runs[uid]
                for container in run.all_containers:
                    container.stop(0.0)
                    container.tick()
                if not any(c.alive for c in run.all_containers):
                    self._forget(run)
            self._write_index()

    def _new_run(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        uid = meta["uid"]
        self.ips.reserve(uid, (pod.get("status") or {}).get("podIP"))  # an earlier agent's pod keeps its IP
        run = PodRun(
            uid,
            meta.get("namespace", "default"),
            meta["name"],
            self.ips.allocate(uid),
            self.state_dir / "pods" / pod_dir_name(meta.get("namespace", "default"), meta["name"], uid),
            pod,
            start_time=nodes.now(),
            transition_time=nodes.now(),
        )
        policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
        init_policy = "Never" if policy == "Never" else "OnFailure"  # the kubelet's rule for init containers
        for spec in (pod.get("spec") or {}).get("initContainers") or ():
            run.init_containers.append(
                Container(spec, init_policy, run.directory / "logs" / spec["name"], run.ip)
            )
        for spec in (pod.get("spec") or {}).get("containers") or ():
            spec = {
                **spec,
                "terminationGracePeriodSeconds": (pod.get("spec") or {}).get(
                    "terminationGracePeriodSeconds", 30
                ),
            }
            run.containers.append(Container(spec, policy, run.directory / "logs" / spec["name"], run.ip))
        self.runs[uid] = run
        self.log(f"pod {run.namespace}/{run.name}: IP {run.ip}, dir {run.directory}")
        return run

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        self.ips.release(run.uid)
        self.log(f"pod {run.namespace}/{run.name}: gone")

    def _sync_pod(self, run: PodRun) -> None:
        meta = run.pod["metadata"]
        if meta.get("deletionTimestamp"):
            if not run.stopping:
                run.stopping = True
                grace = float(meta.get("deletionGracePeriodSeconds") or 0)
                self.log(f"pod {run.namespace}/{run.name}: deleting (grace {grace:g}s)")
                for container in run.all_containers:
                    container.stop(grace)
            for container in run.all_containers:
                container.tick()
            if not any(c.alive for c in run.all_containers):
                self._report(run)
                self._delete(run)
            return
        if not run.started and run.failed is None:
            self._try_start(run)
        for container in run.all_containers:
            container.tick()
        if run.started and not run.main_started:
            self._advance(run)
        self._report(run)

    def _delete(self, run: PodRun) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.core.delete_namespaced_pod(
                run.name,
                run.namespace,
                grace_period_seconds=0,
                body={"preconditions": {"uid": run.uid}, "gracePeriodSeconds": 0},  # type: ignore[arg-type]  # a dict body is sent as it is
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise
        self._forget(run)
        shutil.rmtree(run.directory / "volumes", ignore_errors=True)

    # --- starting a pod ------------------------------------------------------------------------------
    def _try_start(self, run: PodRun) -> None:
        try:
            dns, pending = self._dns(run)
            needed = set()
            for container in run.containers:
                needed |= podspec.mentions(container.spec, pending)
            if needed and time.monotonic() - run.first_seen < DNS_WAIT_S:
                run.waiting = (
                    "ContainerCreating",
                    f"waiting for {', '.join(sorted(needed))} to get a pod IP",
                )
                return
            mounted = volumes.materialise(
                run.pod, run.directory, self.state_dir / "pvc", self._sources(), run.ip
            )
            base = self._base_env(run)
            specs = []
            for container in run.all_containers:
                ctx = podspec.PodContext(
                    pod=run.pod,
                    pod_ip=run.ip,
                    config_maps=self._env_sources(run, container.spec, "configMap"),
                    secrets=self._env_sources(run, container.spec, "secret"),
                    mount_map=volumes.mount_map(container.spec, mounted),
                    dns=dns,
                    base_env=base,
                )
                spec = podspec.process_spec(container.spec, ctx)
                if self.bind_mounts:
                    spec = podspec.ProcessSpec(
                        podspec.with_bind_mounts(spec.argv, podspec.bind_mountable(ctx.mount_map)),
                        spec.env,
                        spec.cwd,
                    )
                specs.append(spec)
        except podspec.SpecError as error:
            self._fail_to_start(run, error.reason, str(error))
            return
        run.started, run.waiting = True, None
        run.init_specs, run.specs = specs[: len(run.init_containers)], specs[len(run.init_containers) :]
        self._advance(run)

    def _advance(self, run: PodRun) -> None:
        """Start the next init container once the one before exited 0, and the containers once
        every init container did (a failed one is restarted by its Container, or fails the pod)."""
        for container, spec in zip(run.init_containers, run.init_specs, strict=True):
            state = container.state
            if state.state == "terminated" and state.exit_code == 0:
                continue
            if container.process_spec is None:
                self._start(run, container, spec)
            return
        run.main_started = True
        for container, spec in zip(run.containers, run.specs, strict=True):
            self._start(run, container, spec)

    def _start(self, run: PodRun, container: Container, spec: podspec.ProcessSpec) -> None:
        container.start(spec, str(run.directory / "work"))
        self.log(
            f"pod {run.namespace}/{run.name}: started {container.state.name} "
            f"(pid {container.process.pid if container.process else '-'}): {' '.join(spec.argv)}"
        )

    def _fail_to_start(self, run: PodRun, reason: str, message: str) -> None:
        """Config errors: retried while young (a ConfigMap may be created right after the pod)."""
        if time.monotonic() - run.first_seen < 30:
            run.waiting = (reason, message)
            return
        run.failed = (reason, message)
        for container in run.containers:
            container.state.reason, container.state.message = reason, message
        self.log(f"pod {run.namespace}/{run.name}: cannot start: {message}")

    def _sources(self) -> volumes.Sources:
        def config_map(namespace: str, name: str) -> dict[str, str] | None:
            body = self._optional(self.core.read_namespaced_config_map, name, namespace)
            return None if body is None else dict(body.get("data") or {})

        def secret(namespace: str, name: str) -> dict[str, str] | None:
            body = self._optional(self.core.read_namespaced_secret, name, namespace)
            return None if body is None else volumes.decode_secret(body)

        def token(pod: Mapping[str, Any], audience: str | None, seconds: int) -> str:
            meta = pod["metadata"]
            spec: dict[str, Any] = {
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
            if audience:
                spec["audiences"] = [audience]
            body = self._get_json(
                self.core.create_namespaced_service_account_token,
                (pod.get("spec") or {}).get("serviceAccountName") or "default",
                meta.get("namespace", "default"),
                {"spec": spec},
            )
            return body["status"]["token"]

        return volumes.Sources(config_map, secret, token)

    def _env_sources(self, run: PodRun, container: Mapping[str, Any], kind: str) -> dict[str, dict[str, str]]:
        names = set()
        for source in container.get("envFrom") or ():
            ref = source.get(f"{kind}Ref")
            if ref:
                names.add(ref.get("name"))
        for var in container.get("env") or ():
            ref = (var.get("valueFrom") or {}).get(f"{kind}KeyRef")
            if ref:
                names.add(ref.get("name"))
        sources = self._sources()
        read = sources.config_map if kind == "configMap" else sources.secret
        out = {}
        for name in names:
            data = read(run.namespace, name)
            if data is not None:
                out[name] = dict(data)
        return out

    def _dns(self, run: PodRun) -> tuple[dict[str, str], set[str]]:
        """Names -> IPs for this pod's namespace, and the names of peers that have no IP yet."""
        dns: dict[str, str] = {}
        pending: set[str] = set()
        ours = {r.uid: r for r in self.runs.values()}
        pods = self._get_json(self.core.list_namespaced_pod, run.namespace).get("items", [])
        for pod in pods:
            names = podspec.pod_dns_names(pod)
            ip = (
                ours[pod["metadata"]["uid"]].ip
                if pod["metadata"]["uid"] in ours
                else (pod.get("status") or {}).get("podIP")
            )
            for name in names:
                if ip:
                    dns[name] = ip
                else:
                    pending.add(name)
        services = self._get_json(self.core.list_namespaced_service, run.namespace).get("items", [])
        for service in services:
            selector = (service.get("spec") or {}).get("selector")
            if not selector:
                continue
            matching = [
                p
                for p in pods
                if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                and p["metadata"]["uid"] in ours
                and not p["metadata"].get("deletionTimestamp")
            ]
            matching.sort(key=lambda p: not (ours[p["metadata"]["uid"]].last_status or {}).get("podIP"))
            if matching:
                for name in podspec.service_dns_names(service["metadata"]["name"], run.namespace):
                    dns.setdefault(name, ours[matching[0]["metadata"]["uid"]].ip)
        return dns, pending

    def _base_env(self, run: PodRun) -> dict[str, str]:
        bin_dir = venv_bin()
        env = {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}
        env.update(
            {
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
                "VIRTUAL_ENV": str(bin_dir.parent),
                "HOSTNAME": (run.pod.get("spec") or {}).get("hostname") or run.name,
                "PYTHONUNBUFFERED": "1",
                "KUBERNETES_SERVICE_HOST": self.apiserver_host,
                "KUBERNETES_SERVICE_PORT": str(self.apiserver_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(self.apiserver_port),
            }
        )
        return env

    # --- status ------------------------------------------------------------------------------------
    @staticmethod
    def _mark_waiting(run: PodRun, states: list[podstatus.ContainerState]) -> tuple[str | None, str | None]:
        """Containers that have not started say why (PodInitializing, a start failure, a wait);
        returns the pod's (reason, message) when it cannot start at all."""
        if run.started and not run.main_started and run.failed is None:
            for state in states:
                state.reason, state.message = "PodInitializing", ""
        if run.failed:
            for state in states:
                state.state, state.exit_code = (
                    "terminated",
                    state.exit_code if state.exit_code is not None else 128,
                )
                state.reason, state.message = run.failed
                state.finished_at = state.finished_at or nodes.now()
            return run.failed
        if run.waiting:
            for state in states:
                state.reason, state.message = run.waiting
        return None, None

    def _report(self, run: PodRun) -> None:
        states = [c.state for c in run.containers]
        init_states = [c.state for c in run.init_containers]
        reason, message = self._mark_waiting(run, states)
        init = podstatus.init_outcome(init_states, run.restart_policy)
        key = json.dumps(
            [
                podstatus.phase(states, run.restart_policy, init),
                [c.to_k8s() for c in [*init_states, *states]],
            ],
            sort_keys=True,
        )
        if key != run.last_key:
            run.transition_time = nodes.now()
        status = podstatus.pod_status(
            states,
            run.restart_policy,
            run.ip,
            "127.0.0.1",
            run.start_time,
            run.transition_time,
            reason,
            message,
            init_states,
        )
        if status == run.last_status:
            return
        from kubernetes.client.rest import ApiException

        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise
        run.last_status, run.last_key = status, key

    # --- logs and the CLI index ------------------------------------------------------------------
    def _log_lookup(self, namespace: str, name: str, container_name: str, previous: bool):
        with self.lock:
            for run in self.runs.values():
                if run.namespace == namespace and run.name == name:
                    for container in run.all_containers:
                        if container.state.name == container_name:
                            restart = container.state.restart_count - (1 if previous else 0)
                            if restart < 0:
                                return None
                            return container.log_path(restart), lambda c=container: c.alive
        directory = find_pod_dir(self.state_dir, namespace, name)  # already gone from the API
        if directory is None:
            return None
        logs = sorted((directory / "logs" / container_name).glob("*.log"), key=lambda p: int(p.stem))
        if len(logs) < (2 if previous else 1):
            return None
        return logs[-2] if previous else logs[-1], lambda: False

    def _write_index(self) -> None:
        index = {
            f"{r.namespace}/{r.name}": {
                "dir": str(r.directory),
                "ip": r.ip,
                "uid": r.uid,
                "pids": {c.state.name: c.process.pid for c in r.all_containers if c.process},
            }
            for r in self.runs.values()
        }
        path = self.state_dir / "index.json"
        tmp = path.with_name("index.json.tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        tmp.replace(path)

    def kill_container(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> bool:
        with self.lock:
            for run in self.runs.values():
                if run.namespace == namespace and run.name == name:
                    return any(c.kill(sig) for c in run.containers)
        return False


def find_pod_dir(state_dir: Path, namespace: str, name: str) -> Path | None:
    """The newest directory of pod namespace/name (pods are recreated under the same name)."""
    candidates = [
        p
        for p in (state_dir / "pods").glob(f"{namespace}_{name}_*")
        if p.name.rsplit("_", 1)[0] == f"{namespace}_{name}"
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
