"""`lmforge operator run`: the kopf process that reconciles TrainJobs, InferenceServices and
QuantizeJobs.

kopf gives us watch streams, retries and Events; this module chooses the settings a production
operator needs and kopf leaves at development defaults, and keeps the process honest:

- peering is mandatory (two replicas never both act). The priority is the start time (ms, plus a
  random tie-breaker), so the NEWEST replica wins: a replica restarted after kill -9 outranks the
  dead one's record and works at once instead of waiting up to 60 s for it to expire. The peer
  identity is the pod name (POD_NAME), so a container restarted in the same pod replaces its own
  record. A replica that must wait says for whom, and until when.
- kopf's API calls retry for ~10 minutes instead of ~1 (an API-server outage or control-plane
  upgrade must not kill the peering keep-alive);
- kopf runs in a thread; the main thread owns SIGTERM (always exits within 8 s), /healthz (fails
  when the reconcilers are dead) and exits 1 when kopf cannot recover (operator/watchdog.py);
- a peering object that cannot be created (403 in a terminating namespace, 404 for a namespace
  that does not exist yet) is logged and retried; the other namespaces keep working;
- handler state under our own `lmforge.dev/` annotations, JSON logs for log shippers.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf

from lmforge import API_GROUP, __version__
from lmforge.operator import watchdog

log = logging.getLogger("lmforge.operator")

PEERING_API = ("kopf.dev", "v1")
# kopf's per-request retries: kopf's default sums to ~1 min, after which the peering keep-alive dies
# and every handler with it. Ours ride out API_RETRY_SECONDS (an outage, a control-plane upgrade);
# past that the watchdog exits 1 and Kubernetes restarts the container.
API_RETRY_SECONDS = 600
KOPF_BACKOFFS = (1, 1, 2, 3, 5, 8, 13, 21)
MAX_BACKOFF_S = 30
PEERING_RETRY_S = 30.0


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    namespaces: tuple[str, ...] = ()
    peering: str = "lmforge"
    standalone: bool = False
    priority: int | None = None  # None: the start time, so the newest replica works
    liveness_port: int = 8080
    verbose: bool = False
    json_logs: bool = True
    api_retry_seconds: int = API_RETRY_SECONDS


def retry_backoffs(total_seconds: int) -> tuple[int, ...]:
    """Backoffs (s) between retries of one API call, summing to `total_seconds`: kopf's own first
    steps, then MAX_BACKOFF_S each, the last one shortened to fit."""
    if total_seconds < 1:
        raise ValueError(f"--api-retry-seconds must be at least 1, got {total_seconds}")
    out: list[int] = []
    for step in (*KOPF_BACKOFFS, *(MAX_BACKOFF_S,) * (total_seconds // MAX_BACKOFF_S + 1)):
        left = total_seconds - sum(out)
        if left <= 0:
            break
        out.append(min(step, left))
    return tuple(out)


def choose_priority(requested: int | None, now: float | None = None, rng: random.Random | None = None) -> int:
    """The newest replica wins: start time in ms, times 1000, plus a random tie-breaker (kopf freezes
    *all* operators that share a priority). A replica restarted after kill -9 therefore outranks the
    dead one's record and starts at once; a standby started later takes over from an older leader
    (kopf pauses the older one when it sees the newer record). Fits JSON's exact integers (< 2**53)."""
    if requested is not None:
        return requested
    started_ms = int((time.time() if now is None else now) * 1000)
    return started_ms * 1000 + (rng or random.SystemRandom()).randint(0, 999)


def peer_identity(env: dict[str, str] | os._Environ[str]) -> str | None:
    """The peering identity: the pod name (a container restarted in the same pod replaces its own
    record instead of waiting behind it); None outside a pod (kopf's user@host/time/random)."""
    return env.get("POD_ID") or env.get("POD_NAME") or None


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
    settings.networking.error_backoffs = retry_backoffs(options.api_retry_seconds)
    # Events are best effort: kopf posts them one at a time from one queue, so an Event that cannot
    # be posted (a terminating namespace: 403) must not hold every other Event for a minute
    settings.posting.default_backoffs = (1, 2)


def register_handlers() -> None:
    """Import the controllers: each module registers its kopf handlers on import."""
    import lmforge.operator.controllers  # noqa: F401


def _make_startup(options: OperatorOptions, priority: int, heartbeat: watchdog.Heartbeat):
    async def configure(
        settings: kopf.OperatorSettings, logger: logging.Logger, memo: kopf.Memo, **_: object
    ) -> None:
        from lmforge.operator.controllers import namespace_release

        apply_settings(settings, options, priority)
        # kopf cancels these tasks at shutdown; until then the first tells the main thread kopf is alive
        asyncio.create_task(watchdog.watch_kopf(heartbeat), name="lmforge watchdog beat")
        if (
            options.namespaces
        ):  # only kopf's per-namespace watches stop early (cluster-wide ones see deletions)
            asyncio.create_task(
                namespace_release.sweep_forever(
                    memo, options.namespaces, settings.persistence.finalizer, logger
                ),
                name="lmforge namespace release",
            )
        if not options.standalone:
            missing = await ensure_peering_object(options, priority, logger)
            if missing:
                asyncio.create_task(
                    _retry_peering(options, priority, missing, logger), name="lmforge peering creator"
                )
        logger.info(
            "lmforge operator %s starting: peering=%s priority=%d scope=%s",
            __version__,
            "standalone" if options.standalone else options.peering,
            priority,
            ",".join(options.namespaces) or "cluster-wide",
        )

    return configure


def peering_bodies(options: OperatorOptions) -> list[dict[str, Any]]:
    group, version = PEERING_API
    if options.namespaces:
        return [
            {
                "apiVersion": f"{group}/{version}",
                "kind": "KopfPeering",
                "metadata": {"name": options.peering, "namespace": namespace},
            }
            for namespace in options.namespaces
        ]
    return [
        {
            "apiVersion": f"{group}/{version}",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": options.peering},
        }
    ]


def higher_peers(
    peering: dict[str, Any] | None, priority: int, identity: str | None, now: float
) -> list[tuple[str, int, float]]:
    """(identity, priority, seconds it may still hold) of the live peers that outrank us: whom a
    starting replica waits for, and for how long at most."""
    from datetime import datetime

    out = []
    for peer, info in ((peering or {}).get("status") or {}).items():
        if peer == identity or not isinstance(info, dict):
            continue
        try:
            seen = datetime.fromisoformat(str(info["lastseen"]).replace("Z", "+00:00")).timestamp()
            left = seen + float(info.get("lifetime", 60)) - now
            peer_priority = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if left > 0 and peer_priority >= priority:
            out.append((peer, peer_priority, left))
    return out


async def ensure_peering_object(
    options: OperatorOptions, priority: int | None = None, logger: logging.Logger | None = None
) -> list[dict[str, Any]]:
    """Create the (Cluster)KopfPeering objects that are missing, so installing the CRDs is enough
    (AlreadyExists is success: every replica runs this at start). Returns the bodies that could not
    be created (403 in a terminating namespace, 404 for a missing namespace or CRD): each is logged,
    and the caller retries them; the other namespaces work meanwhile. Also logs, at start, the live
    peers that outrank this replica (it waits for them)."""
    import aiohttp

    from lmforge.operator.kube import CLUSTER_KOPF_PEERINGS, KOPF_PEERINGS, ApiError, KubeApi

    logger = logger or log
    api = await asyncio.to_thread(KubeApi.from_environment)
    failed = []
    try:
        for body in peering_bodies(options):
            meta = body["metadata"]
            try:
                existing = await api.get(
                    KOPF_PEERINGS if meta.get("namespace") else CLUSTER_KOPF_PEERINGS,
                    meta.get("namespace"),
                    meta["name"],
                )
                if existing is None:
                    await api.create(body)  # None when another replica created it meanwhile
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:  # never an exit: retried
                where = f"namespace {meta['namespace']!r}" if meta.get("namespace") else "cluster-wide"
                cause = f"{exc.status} {exc.reason}" if isinstance(exc, ApiError) else repr(exc)
                logger.warning(
                    "cannot create the peering object %r (%s): %s; handlers there wait for it, retrying every "
                    "%.0f s (are the CRDs in crds/ installed, does the namespace exist?)",
                    options.peering,
                    where,
                    cause,
                    PEERING_RETRY_S,
                )
                failed.append(body)
                continue
            if priority is not None:
                for peer, peer_priority, left in higher_peers(
                    existing, priority, peer_identity(os.environ), time.time()
                ):
                    logger.warning(
                        "waiting for peer %s (priority %d >= ours %d): it works until its record "
                        "expires in %.0f s unless it stops cleanly first",
                        peer,
                        peer_priority,
                        priority,
                        left,
                    )
    finally:
        await api.close()
    return failed


async def _retry_peering(
    options: OperatorOptions, priority: int, missing: list[dict[str, Any]], logger: logging.Logger
) -> None:
    while missing:
        await asyncio.sleep(PEERING_RETRY_S)
        namespaces = tuple(
            body["metadata"]["namespace"] for body in missing if body["metadata"].get("namespace")
        )
        retry = OperatorOptions(namespaces=namespaces, peering=options.peering)
        missing = await ensure_peering_object(retry, priority, logger)
    logger.info("every peering object of %r exists now", options.peering)


class _DropThreadSignalWarning(logging.Filter):
    """kopf warns that it ignores signals outside the main thread: by design here, the main thread
    handles them (see `run`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OS signals are ignored" not in record.getMessage()


def run(
    namespaces: list[str] | tuple[str, ...] = (),
    peering: str = "lmforge",
    standalone: bool = False,
    liveness_port: int = 8080,
    verbose: bool = False,
    priority: int | None = None,
    json_logs: bool = True,
    stop_flag: threading.Event | None = None,
    api_retry_seconds: int = API_RETRY_SECONDS,
) -> int:
    """Run until SIGTERM/SIGINT or `stop_flag` is set (0), or until the reconcilers die (1, so that
    Kubernetes restarts the container). Never outlives a stop request by more than STOP_DEADLINE_S."""
    options = OperatorOptions(
        namespaces=tuple(namespaces),
        peering=peering,
        standalone=standalone,
        priority=priority,
        liveness_port=liveness_port,
        verbose=verbose,
        json_logs=json_logs,
        api_retry_seconds=api_retry_seconds,
    )
    retry_backoffs(api_retry_seconds)  # refuse a bad value before anything starts
    _configure_logging(verbose, json_logs)
    chosen = choose_priority(priority)
    heartbeat = watchdog.Heartbeat()
    registry = kopf.get_default_registry()
    register_handlers()
    kopf.on.startup(registry=registry, id="lmforge-configure")(_make_startup(options, chosen, heartbeat))
    kopf_stop = threading.Event()
    identity = peer_identity(os.environ)

    def run_kopf() -> None:
        try:
            kopf.run(
                registry=registry,
                standalone=standalone,
                priority=chosen,
                peering_name=peering,
                identity=identity,  # type: ignore[arg-type]  # kopf's Identity: a NewType of str it does not export
                clusterwide=not namespaces,
                namespaces=list(namespaces),
                stop_flag=kopf_stop,
            )
        except BaseException:  # noqa: BLE001 - reported here, decided on by the watchdog
            log.exception("kopf failed")

    requested: list[float] = []

    def request_stop(signum: int | None = None, _frame: object = None) -> None:
        if requested and signum is not None:  # a second signal: no more waiting
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            _exit_now(0)
        if not requested:
            requested.append(time.monotonic())
            log.info(
                "stop requested (%s): stopping the handlers",
                signal.Signals(signum).name if signum else "flag",
            )
        kopf_stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    current = [watchdog.Verdict(None, "starting", False)]
    liveness = watchdog.LivenessServer(liveness_port, lambda: current[0]).start() if liveness_port else None
    thread = threading.Thread(target=run_kopf, name="kopf", daemon=True)
    thread.start()
    try:
        exit_code, reason = _watch(thread, heartbeat, kopf_stop, stop_flag, requested, request_stop, current)
    finally:
        if liveness is not None:
            liveness.close()
    level = logging.INFO if exit_code == 0 and not thread.is_alive() else logging.ERROR
    log.log(level, "lmforge operator stopped: %s", reason)
    if thread.is_alive():  # kopf's shutdown hangs: do not let its threads keep the process
        _exit_now(exit_code)
    return exit_code


def _configure_logging(verbose: bool, json_logs: bool) -> None:
    for stream in (sys.stdout, sys.stderr):  # logs reach `kubectl logs` at once, not per 8 KiB block
        if isinstance(stream, io.TextIOWrapper):  # not when a test harness captured them
            stream.reconfigure(line_buffering=True)
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL)
    logging.getLogger("kopf._core.reactor.running").addFilter(_DropThreadSignalWarning())


def _watch(
    thread: threading.Thread,
    heartbeat: watchdog.Heartbeat,
    kopf_stop: threading.Event,
    stop_flag: threading.Event | None,
    requested: list[float],
    request_stop: Callable[[], None],
    current: list[watchdog.Verdict],
) -> tuple[int, str]:
    """Every 0.25 s: kopf's thread and the reconcilers' heartbeat -> the watchdog's verdict (published
    in current[0] for the liveness probe), until it says exit: (exit code, reason). Dead reconcilers
    stop kopf cleanly first, so the peering record is released for the next replica."""
    dead_since: float | None = None
    while True:
        thread.join(0.25)
        if stop_flag is not None and stop_flag.is_set() and not requested:
            request_stop()
        now = time.monotonic()
        started, last_beat, dead = heartbeat.snapshot()
        if dead and dead_since is None and not requested:  # kopf's tasks end on a requested stop too
            dead_since = now
            log.error("reconcilers are dead (%s): stopping kopf, then exiting 1", ", ".join(dead))
            kopf_stop.set()  # a clean stop releases our peering record for the next replica
        current[0] = verdict = watchdog.verdict(
            now,
            kopf_running=thread.is_alive(),
            started=started,
            last_beat=last_beat,
            dead=dead,
            stop_requested_at=requested[0] if requested else None,
            dead_since=dead_since,
        )
        if verdict.exit_code is not None:
            return verdict.exit_code, verdict.reason


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
