"""`lmforge operator run`: the kopf process that reconciles TrainJobs, InferenceServices and
QuantizeJobs.

kopf already gives us watch streams, retries, Events and SIGTERM handling; this module only
chooses settings that a production operator needs and kopf leaves at development defaults:
peering that is mandatory (two replicas never both act), a random priority (equal priorities
make kopf freeze every replica), handler state under our own `lmforge.dev/` annotations, and
JSON logs for log shippers.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
from dataclasses import dataclass

import kopf

from lmforge import API_GROUP, __version__

log = logging.getLogger("lmforge.operator")

PEERING_API = ("kopf.dev", "v1")


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    namespaces: tuple[str, ...] = ()
    peering: str = "lmforge"
    standalone: bool = False
    priority: int | None = None  # None: random, so replicas never tie
    liveness_port: int = 8080
    verbose: bool = False
    json_logs: bool = True


def choose_priority(requested: int | None, rng: random.Random | None = None) -> int:
    """kopf freezes *all* operators that share a priority, so replicas must differ. A random
    priority in a wide range makes a tie between two replicas practically impossible; the one with
    the highest value works, the others stand by and take over when its keep-alive lapses."""
    if requested is not None:
        return requested
    return (rng or random.SystemRandom()).randint(1, 2**31 - 1)


def apply_settings(settings: kopf.OperatorSettings, options: OperatorOptions, priority: int) -> None:
    """Pure mutation of kopf's settings object (unit-tested without a cluster)."""
    settings.peering.name = options.peering
    settings.peering.standalone = options.standalone
    settings.peering.mandatory = not options.standalone
    settings.peering.priority = priority
    settings.peering.clusterwide = not options.namespaces
    settings.posting.reporting_component = "lmforge-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME", os.uname().nodename)
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def register_handlers() -> None:
    """Import the controllers: each module registers its kopf handlers on import."""
    import lmforge.operator.controllers  # noqa: F401


def _make_startup(options: OperatorOptions, priority: int):
    async def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: object) -> None:
        apply_settings(settings, options, priority)
        if not options.standalone:
            await ensure_peering_object(options)
        logger.info(
            "lmforge operator %s starting: peering=%s priority=%d scope=%s",
            __version__,
            "standalone" if options.standalone else options.peering,
            priority,
            ",".join(options.namespaces) or "cluster-wide",
        )

    return configure


async def ensure_peering_object(options: OperatorOptions) -> None:
    """Create the (Cluster)KopfPeering object if it is missing, so installing the CRDs is enough.
    AlreadyExists is success: every replica runs this at start."""
    import asyncio

    from lmforge.operator.kube import ApiError, KubeApi

    group, version = PEERING_API
    if options.namespaces:
        bodies = [{"apiVersion": f"{group}/{version}", "kind": "KopfPeering",
                   "metadata": {"name": options.peering, "namespace": namespace}} for namespace in options.namespaces]
    else:
        bodies = [{"apiVersion": f"{group}/{version}", "kind": "ClusterKopfPeering",
                   "metadata": {"name": options.peering}}]
    api = await asyncio.to_thread(KubeApi.from_environment)
    try:
        for body in bodies:
            await api.create(body)  # None when it exists
    except ApiError as exc:
        raise kopf.PermanentError(
            f"cannot create the peering object {options.peering!r} ({exc.status} {exc.reason}); "
            "are the CRDs in crds/ installed?"
        ) from exc
    finally:
        await api.close()


def run(
    namespaces: list[str] | tuple[str, ...] = (),
    peering: str = "lmforge",
    standalone: bool = False,
    liveness_port: int = 8080,
    verbose: bool = False,
    priority: int | None = None,
    json_logs: bool = True,
    stop_flag: threading.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (kopf installs the handlers) or `stop_flag` is set; returns 0 on
    a clean stop."""
    options = OperatorOptions(
        namespaces=tuple(namespaces), peering=peering, standalone=standalone, priority=priority,
        liveness_port=liveness_port, verbose=verbose, json_logs=json_logs,
    )
    for stream in (sys.stdout, sys.stderr):  # logs reach `kubectl logs` at once, not per 8 KiB block
        stream.reconfigure(line_buffering=True)
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL)
    chosen = choose_priority(priority)
    registry = kopf.get_default_registry()
    register_handlers()
    kopf.on.startup(registry=registry, id="lmforge-configure")(_make_startup(options, chosen))
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    kopf.run(
        registry=registry,
        standalone=standalone,
        priority=chosen,
        peering_name=peering,
        liveness_endpoint=liveness,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
    )
    log.info("lmforge operator stopped")
    return 0
