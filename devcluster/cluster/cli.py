"""`lmforge cluster up|down|reset|status|build`: argument wiring only; the work is in cluster.py."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.devcluster.cluster import paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default=None,
        help=f"directory of this cluster's pids, logs, certs and data "
        f"(default: ${paths.CLUSTER_DIR_ENV} or ~/.cache/lmforge/cluster)",
    )
    actions = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = actions.add_parser(
        "up",
        parents=[common],
        help="start etcd, kube-apiserver, controller-manager, scheduler and kwok nodes "
        "(builds the binaries on first use)",
    )
    up.add_argument("--nodes", type=int, default=4, help="number of simulated 8-GPU nodes (default: 4)")
    actions.add_parser("down", parents=[common], help="stop every process the cluster started (data is kept)")
    reset = actions.add_parser(
        "reset",
        parents=[common],
        help="stop the cluster and DELETE its data (every namespace, CRD and object)",
    )
    reset.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    status = actions.add_parser("status", parents=[common], help="components, pids and health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    actions.add_parser("build", help="only build (or check) the cached binaries and print their directory")


def main(args: argparse.Namespace) -> int:
    from lmforge.devcluster.cluster import cluster
    from lmforge.devcluster.cluster.build import BuildError, ensure_binaries

    try:
        if args.cluster_command == "up":
            info = cluster.up(args.state_dir, num_nodes=args.nodes)
            print(f"export KUBECONFIG={info.kubeconfig}")
            print(f"# kubectl: {info.kubectl}\n# helm:    {info.helm}")
            return 0
        if args.cluster_command == "down":
            cluster.down(args.state_dir)
            return 0
        if args.cluster_command == "reset":
            if not args.yes and not confirm_reset(cluster.layout_for(args.state_dir).state_dir):
                print(
                    "lmforge cluster reset: nothing deleted (confirm with 'yes', or pass --yes)",
                    file=sys.stderr,
                )
                return 1
            cluster.reset(args.state_dir)
            return 0
        if args.cluster_command == "status":
            return _print_status(cluster.status(args.state_dir), as_json=args.json)
        if args.cluster_command == "build":
            print(ensure_binaries().bin_dir)
            return 0
    except (cluster.ClusterError, BuildError) as error:
        print(f"lmforge cluster {args.cluster_command}: {error}", file=sys.stderr)
        return 1
    raise AssertionError(args.cluster_command)


def confirm_reset(state_dir, ask=input, interactive=None) -> bool:
    """True only when a person typed 'yes'; a non-interactive stdin never confirms."""
    if not (sys.stdin.isatty() if interactive is None else interactive):
        return False
    answer = ask(f"delete every object of the cluster in {state_dir} (etcd data)? type 'yes': ")
    return answer.strip().lower() == "yes"


def _print_status(current, as_json: bool) -> int:
    """Exit 0 when the cluster is fully up, 1 otherwise (scripts can test it)."""
    if as_json:
        print(
            json.dumps(
                {
                    "state_dir": str(current.state_dir),
                    "running": current.running,
                    "kubeconfig": str(current.kubeconfig) if current.kubeconfig else None,
                    "apiserver": current.apiserver_url,
                    "components": [
                        {
                            "name": c.name,
                            "pid": c.pid,
                            "alive": c.alive,
                            "healthy": c.healthy,
                            "ports": list(c.ports),
                            "log": c.log,
                        }
                        for c in current.components
                    ],
                },
                indent=2,
            )
        )
        return 0 if current.running else 1
    if not current.components:
        print(f"not running (state dir {current.state_dir})")
        return 1
    print(
        f"{'up' if current.running else 'DEGRADED'}: {current.apiserver_url}  KUBECONFIG={current.kubeconfig}"
    )
    print(f"{'COMPONENT':<24} {'PID':>8}  {'STATE':<9} PORTS")
    for c in current.components:
        state = "healthy" if c.healthy else ("unhealthy" if c.alive else "dead")
        print(f"{c.name:<24} {c.pid:>8}  {state:<9} {','.join(map(str, c.ports))}")
    return 0 if current.running else 1
