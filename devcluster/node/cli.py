"""`lmforge node run | logs | endpoints | kill` (wired by cli.py: `add_arguments` + `main`).

lmforge node run                      # register lmforge-local and run its pods (foreground)
lmforge node logs <pod> [-c C] [-p]   # a container's log file (what `kubectl logs` also serves)
lmforge node endpoints <service>      # ready pod IP:targetPort of a Service, reachable from the host
lmforge node kill <pod> [--signal S]  # signal a container's main process (crash injection)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from lmforge.devcluster.node.node import NODE_NAME

STATE_DIR_ENV = "LMFORGE_NODE_DIR"


def default_state_dir() -> Path:
    from lmforge.devcluster.cluster import paths

    configured = os.environ.get(STATE_DIR_ENV)
    return Path(configured).expanduser() if configured else paths.cache_root() / "localnode"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"pod directories, logs, index (default: ${STATE_DIR_ENV} or <cache>/localnode)",
    )
    actions = parser.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="register the process node and run the pods bound to it")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG")
    run.add_argument("--name", default=NODE_NAME, help=f"node name (default: {NODE_NAME})")
    run.add_argument("--kubelet-port", type=int, default=0, help="kubelet API port (default: any free port)")
    logs = actions.add_parser("logs", help="print a container's log")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", default=None)
    logs.add_argument("-p", "--previous", action="store_true")
    endpoints = actions.add_parser("endpoints", help="ready pod IP:port of a Service")
    endpoints.add_argument("service")
    endpoints.add_argument("-n", "--namespace", default="default")
    endpoints.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    kill = actions.add_parser("kill", help="signal a pod's container process")
    kill.add_argument("pod")
    kill.add_argument("-n", "--namespace", default="default")
    kill.add_argument("-c", "--container", default=None)
    kill.add_argument("--signal", default="KILL", help="signal name (default: KILL)")


def main(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    if args.node_command == "run":
        return run(state_dir, args.kubeconfig, args.name, args.kubelet_port)
    if args.node_command == "logs":
        text = logs(state_dir, args.namespace, args.pod, args.container, args.previous)
        if text is None:
            print(f"no logs for pod {args.namespace}/{args.pod} under {state_dir}", file=sys.stderr)
            return 1
        sys.stdout.write(text)
        return 0
    if args.node_command == "endpoints":
        found = endpoints(args.kubeconfig, args.namespace, args.service)
        for endpoint in found:
            print(endpoint)
        return 0 if found else 1
    if args.node_command == "kill":
        return 0 if kill(state_dir, args.namespace, args.pod, args.container, args.signal) else 1
    raise SystemExit(f"unknown action {args.node_command}")


def run(state_dir: Path, kubeconfig: str | None, name: str = NODE_NAME, kubelet_port: int = 0) -> int:
    from lmforge.devcluster.node.agent import Agent

    agent = Agent(kubeconfig, state_dir, name, kubelet_port)

    def stop(_signum, _frame) -> None:
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


def logs(
    state_dir: Path, namespace: str, pod: str, container: str | None = None, previous: bool = False
) -> str | None:
    from lmforge.devcluster.node.agent import find_pod_dir

    directory = find_pod_dir(state_dir, namespace, pod)
    if directory is None:
        return None
    containers = (
        sorted(p.name for p in (directory / "logs").iterdir()) if (directory / "logs").exists() else []
    )
    name = container or (containers[0] if containers else None)
    files = sorted((directory / "logs" / name).glob("*.log"), key=lambda p: int(p.stem)) if name else []
    if len(files) < (2 if previous else 1):
        return None
    return (files[-2] if previous else files[-1]).read_text(errors="replace")


def endpoints(kubeconfig: str | None, namespace: str, service: str) -> list[str]:
    """`<pod IP>:<targetPort>` of each ready pod behind the Service (named target ports resolved)."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    # _preload_content=False returns the raw urllib3 response (`.data`), which the client's hints omit
    svc = json.loads(api.read_namespaced_service(service, namespace, _preload_content=False).data)  # type: ignore[attr-defined]
    selector = (svc.get("spec") or {}).get("selector") or {}
    if not selector:
        return []
    label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
    pods = json.loads(
        api.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False).data  # type: ignore[attr-defined]
    )["items"]
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()
        )
        if not (ready and status.get("podIP")) or pod["metadata"].get("deletionTimestamp"):
            continue
        for port in (svc.get("spec") or {}).get("ports") or ():
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and not target.isdigit():
                named = [
                    p["containerPort"]
                    for c in pod["spec"]["containers"]
                    for p in c.get("ports") or ()
                    if p.get("name") == target
                ]
                if not named:
                    continue
                target = named[0]
            out.append(f"{status['podIP']}:{target}")
    return out


def kill(state_dir: Path, namespace: str, pod: str, container: str | None = None, sig: str = "KILL") -> bool:
    """Signal the main process of a running container (its pid file under the pod dir)."""
    from lmforge.devcluster.node.agent import find_pod_dir

    directory = find_pod_dir(state_dir, namespace, pod)
    if directory is None:
        return False
    names = [container] if container else sorted(p.name for p in (directory / "logs").iterdir())
    number = getattr(signal, f"SIG{sig.upper().removeprefix('SIG')}")
    for name in names:
        pid_file = directory / "logs" / name / "pid"
        try:
            os.kill(int(pid_file.read_text()), number)
            return True
        except (OSError, ValueError):
            continue
    return False
