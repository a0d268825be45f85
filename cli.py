"""The `lmforge` command line. Sub-commands import their implementation lazily so that
`lmforge --help` and the operator image never pull in torch."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence


def _operator_run(args: argparse.Namespace) -> int:
    from lmforge.operator.main import run

    if args.api_retry_seconds < 1:
        print(
            f"lmforge operator run: --api-retry-seconds must be at least 1, got {args.api_retry_seconds}",
            file=sys.stderr,
        )
        return 2

    return run(
        namespaces=args.namespace,
        peering=args.peering,
        standalone=args.standalone,
        priority=args.priority,
        liveness_port=args.liveness_port,
        verbose=args.verbose,
        api_retry_seconds=args.api_retry_seconds,
    )


def _has_devcluster() -> bool:
    """lmforge.devcluster ships in the source checkout only (not in the wheel or the operator image)."""
    return importlib.util.find_spec("lmforge.devcluster") is not None


def _needs_checkout(command: str) -> int:
    print(
        f"lmforge {command}: the local cluster and process node are development tools that ship only in "
        "the source checkout (lmforge.devcluster); clone the repository and run `make install`",
        file=sys.stderr,
    )
    return 2


def _cluster(args: argparse.Namespace) -> int:
    if not _has_devcluster():
        return _needs_checkout("cluster")
    from lmforge.devcluster.cluster import cli as cluster_cli

    return cluster_cli.main(args)


def _serve(args: argparse.Namespace) -> int:
    from lmforge.runtime.server import run_server

    return run_server(args)


def _train(args: argparse.Namespace) -> int:
    from lmforge.runtime.train import run_args

    return run_args(args)


def _quantize(args: argparse.Namespace) -> int:
    from lmforge.runtime.quantize import main as quantize_main

    return quantize_main(args.raw_argv)


def _fetch(args: argparse.Namespace) -> int:
    from lmforge.runtime.storage.cli import run_fetch

    return run_fetch(args)


def _upload(args: argparse.Namespace) -> int:
    from lmforge.runtime.storage.cli import run_upload

    return run_upload(args)


def _node(args: argparse.Namespace) -> int:
    if not _has_devcluster():
        return _needs_checkout("node")
    from lmforge.devcluster.node import cli as node_cli

    return node_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__

    parser = argparse.ArgumentParser(
        prog="lmforge", description="Train, quantize and serve LLMs on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    operator = commands.add_parser("operator", help="run the Kubernetes operator")
    operator_commands = operator.add_subparsers(dest="operator_command", required=True, metavar="ACTION")
    run = operator_commands.add_parser(
        "run", help="start the kopf operator (cluster-wide unless --namespace)"
    )
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    run.add_argument(
        "--peering",
        default="lmforge",
        help="kopf peering name: replicas sharing it never reconcile the same object (default: lmforge)",
    )
    run.add_argument(
        "--standalone", action="store_true", help="no peering (single replica, e.g. local debugging)"
    )
    run.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest live replica works, others stand by "
        "(default: the start time, so the newest replica works)",
    )
    run.add_argument(
        "--api-retry-seconds",
        type=int,
        default=600,
        help="how long one API call is retried (an API-server outage) before the operator exits 1 "
        "for Kubernetes to restart it (default: 600)",
    )
    run.add_argument(
        "--liveness-port", type=int, default=8080, help="port of the /healthz endpoint (0: disabled)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_operator_run)

    cluster = commands.add_parser(
        "cluster", help="local Kubernetes control plane (etcd, apiserver, kwok nodes)"
    )
    if _has_devcluster():
        from lmforge.devcluster.cluster.cli import add_arguments as add_cluster_arguments

        add_cluster_arguments(cluster)
    cluster.set_defaults(func=_cluster)

    serve = commands.add_parser("serve", help="OpenAI-compatible inference server for a local HF checkpoint")
    from lmforge.runtime.serve_args import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    train = commands.add_parser("train", help="fine-tune (full or LoRA) locally or inside a TrainJob pod")
    from lmforge.runtime.train_args import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=_train)

    quantize = commands.add_parser(
        "quantize", help="quantize a checkpoint to compressed-tensors (W8A16, W4A16, FP8)"
    )
    from lmforge.runtime.quantize_args import add_quantize_arguments

    add_quantize_arguments(quantize)
    quantize.set_defaults(func=_quantize)

    from lmforge.runtime.storage.cli import add_fetch_arguments, add_upload_arguments

    fetch = commands.add_parser(
        "fetch", help="download s3:// or hf:// into a directory (the storage initializer; node cache aware)"
    )
    add_fetch_arguments(fetch)
    fetch.set_defaults(func=_fetch)
    upload = commands.add_parser("upload", help="upload a directory to s3:// (manifest written last)")
    add_upload_arguments(upload)
    upload.set_defaults(func=_upload)

    node = commands.add_parser(
        "node", help="local process node: run pods bound to it as local processes (dev)"
    )
    if _has_devcluster():
        from lmforge.devcluster.node.cli import add_arguments as add_node_arguments

        add_node_arguments(node)
    node.set_defaults(func=_node)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.raw_argv = raw[1:]  # for sub-commands that re-parse their own flags
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
