"""kopf handlers for TrainJob: observe -> `decide` -> write status -> Events -> act.

One kopf daemon per TrainJob runs the level-based loop, so reconciles of one job never overlap.
It wakes on any event of the job's pods (an index keeps them in memory: no LIST per reconcile),
on spec changes of the job, and every `requeue_after` seconds otherwise. Everything it needs is
in the cluster (status + pods), so an operator killed at any moment resumes where it stopped:

- the status is written first, with the job's resourceVersion (PUT): a decision taken on a stale
  view fails with 409 Conflict and is taken again on a fresh read;
- pods, the Service and the ConfigMap have fixed names: AlreadyExists is success, NotFound on
  delete is success.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from lmforge.operator.api import constants as c
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders import trainjob as build
from lmforge.operator.builders.trainjob_policy import Decision, Observed, WorkerPod, decide

PLURAL = "trainjobs"
POD_LABELS = {c.LABEL_KIND: "TrainJob", c.LABEL_JOB_NAME: kopf.PRESENT}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def build_config_from_env() -> build.BuildConfig:
    """LMFORGE_RUNTIME_IMAGE: the default worker image; LMFORGE_WORKER_SERVICE_ACCOUNT: the
    workers' ServiceAccount (it needs `patch` on pods for the progress annotation)."""
    return build.BuildConfig(default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
                             service_account=os.environ.get("LMFORGE_WORKER_SERVICE_ACCOUNT") or None)


class KubeApi:
    """The few calls the controller makes, idempotent, run in a small thread pool (the official
    client is synchronous)."""

    def __init__(self, workers: int = 16) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = workers
        api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lmforge-kube")

    async def _call(self, fn: Callable[..., Any], *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status in ok:
                    return None
                raise

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call(self.custom.get_namespaced_custom_object, c.GROUP, c.VERSION, namespace, PLURAL,
                                name, ok=(404,))

    async def replace_status(self, job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        return await self._call(self.custom.replace_namespaced_custom_object_status, c.GROUP, c.VERSION,
                                meta["namespace"], PLURAL, meta["name"], job)

    async def create(self, obj: dict[str, Any]) -> None:
        kind, namespace = obj["kind"], obj["metadata"]["namespace"]
        create = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "ConfigMap": self.core.create_namespaced_config_map}[kind]
        await self._call(create, namespace, obj, ok=(409,))

    async def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        await self._call(self.core.delete_namespaced_pod, name, namespace, ok=(404,),
                         grace_period_seconds=0 if force else None)

    async def delete_children(self, namespace: str, job_name: str) -> None:
        """Explicitly, because the garbage collector may lag behind (or be absent)."""
        selector = f"{c.LABEL_JOB_NAME}={job_name},{c.LABEL_KIND}=TrainJob"
        await asyncio.gather(
            self._call(self.core.delete_collection_namespaced_pod, namespace, label_selector=selector, ok=(404,)),
            self._call(self.core.delete_namespaced_service, job_name, namespace, ok=(404,)),
            self._call(self.core.delete_namespaced_config_map, build.config_map_name(job_name), namespace, ok=(404,)),
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        await self._call(self.custom.delete_namespaced_custom_object, c.GROUP, c.VERSION, namespace, PLURAL, name,
                         ok=(404,))


@dataclass(slots=True)
class JobHandle:
    """Per-job memory of this process: how to wake its daemon, and the newest copy of the job
    we know of (our own status write may be newer than the watch has delivered yet)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    latest: dict[str, Any] | None = None
    generation: int | None = None


@dataclass(slots=True)
class Runtime:
    cfg: build.BuildConfig
    api_factory: Callable[[], KubeApi] = KubeApi
    handles: dict[tuple[str, str], JobHandle] = field(default_factory=dict)
    _api: KubeApi | None = None

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            self._api = self.api_factory()
        return self._api

    def handle(self, namespace: str, name: str) -> JobHandle:
        return self.handles.setdefault((namespace, name), JobHandle())

    def wake(self, namespace: str, name: str) -> None:
        handle = self.handles.get((namespace, name))
        if handle is not None:
            handle.wake.set()


def _resource_version(obj: Mapping[str, Any] | None) -> int:
    try:
        return int(obj["metadata"]["resourceVersion"])  # etcd revisions: newer is larger
    except (KeyError, TypeError, ValueError):
        return -1


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A kopf Body (nested mapping views) as plain dicts and lists."""
    if isinstance(body, Mapping):
        return {k: _plain(v) for k, v in body.items()}
    if isinstance(body, list):
        return [_plain(v) for v in body]
    return body


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="trainjob-runtime")
def _startup(memo: kopf.Memo, **_: Any) -> None:
    memo.trainjob = Runtime(cfg=build_config_from_env())


@kopf.index("pods", labels=POD_LABELS)
def trainjob_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    """(namespace, job name) -> the job's worker pods, kept current by the pod watch."""
    pod = WorkerPod.from_pod(body)
    return {(namespace, labels[c.LABEL_JOB_NAME]): pod} if pod else {}


@kopf.on.event("pods", labels=POD_LABELS)
def _pod_event(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    memo.trainjob.wake(namespace, labels[c.LABEL_JOB_NAME])


@kopf.on.event(c.GROUP, c.VERSION, PLURAL)
def _job_event(namespace: str, name: str, meta: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """Spec changes (suspend flips, TTL edits) wake the daemon at once; our own status writes do not."""
    handle = memo.trainjob.handles.get((namespace, name))
    if handle is not None and meta.get("generation") != handle.generation:
        handle.generation = meta.get("generation")
        handle.wake.set()


@kopf.daemon(c.GROUP, c.VERSION, PLURAL, id="trainjob", cancellation_timeout=10.0)
async def trainjob_daemon(body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped,
                          memo: kopf.Memo, trainjob_pods: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    runtime: Runtime = memo.trainjob
    handle = runtime.handle(namespace, name)
    handle.generation = body.get("metadata", {}).get("generation")
    try:
        while not stopped:
            handle.wake.clear()
            delay = await reconcile(runtime, handle, body, trainjob_pods, logger)
            if delay is None:
                return  # finished and nothing left to do: the daemon (and its finalizer) go away
            if delay > 0:
                await _sleep(handle.wake, stopped, delay)
    finally:
        runtime.handles.pop((namespace, name), None)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.on.delete(c.GROUP, c.VERSION, PLURAL, id="trainjob-cleanup", optional=True)
async def _cleanup(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await memo.trainjob.api.delete_children(namespace, name)


# --- one reconcile ----------------------------------------------------------------------------------


async def reconcile(runtime: Runtime, handle: JobHandle, body: kopf.Body, pods_index: kopf.Index,
                    logger: logging.Logger) -> float | None:
    """One observe/decide/act pass. Returns seconds until the next pass (0: at once), or None
    when the job is finished and nothing is left to watch."""
    live = _plain(body)
    job = handle.latest if _resource_version(handle.latest) > _resource_version(live) else live
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return 5.0  # kopf stops the daemon and runs the cleanup handler
    try:
        spec = TrainJobSpec.model_validate(job.get("spec") or {})
    except ValueError as exc:  # the CRD in the cluster is older or newer than this operator
        logger.error("invalid TrainJob spec: %s", exc)
        kopf.event(job, type="Warning", reason="InvalidSpec", message=str(exc)[:1024])
        return 300.0
    status = TrainJobStatus.model_validate(job.get("status") or {})
    observed = Observed(name=name, generation=meta.get("generation", 0), spec=spec, status=status,
                        pods=tuple(pods_index.get((namespace, name), ())), now=now_utc())
    decision = decide(observed)
    api = runtime.api

    if decision.status != status:
        try:
            handle.latest = await api.replace_status({**job, "status": decision.status.to_k8s()})
        except Exception as exc:  # noqa: BLE001 - kubernetes ApiException, kept lazy
            code = getattr(exc, "status", None)
            if code == 404:
                return None
            if code == 409:  # someone (the user, or our own last write) changed it: decide again
                handle.latest = await api.get_job(namespace, name)
                return 0.0 if handle.latest else None
            raise
    for event in decision.events:
        kopf.event(job, type=event.type, reason=event.reason, message=event.message)
    await _act(api, runtime.cfg, job, spec, decision)
    if decision.delete_job:
        return None
    finished = decision.status.phase in c.TERMINAL_PHASES
    settled = all(not p.active and not p.deleting for p in observed.pods)  # only finished pods, kept for logs
    idle = settled and not (decision.delete_pods or decision.force_delete_pods)
    if finished and spec.ttl_seconds_after_finished is None and idle:
        return None
    return decision.requeue_after


async def _act(api: KubeApi, cfg: build.BuildConfig, job: dict[str, Any], spec: TrainJobSpec,
               decision: Decision) -> None:
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ref = build.JobRef(name=name, namespace=namespace, uid=meta["uid"])
    await asyncio.gather(*(api.delete_pod(namespace, pod, force=True) for pod in decision.force_delete_pods))
    await asyncio.gather(*(api.delete_pod(namespace, pod) for pod in decision.delete_pods))
    if decision.create_ranks:
        await asyncio.gather(api.create(build.headless_service(ref, cfg)), api.create(build.config_map(ref, spec)))
        pods = build.gang(ref, spec, decision.status.restarts, list(decision.create_ranks), cfg)
        await asyncio.gather(*(api.create(pod) for pod in pods))
    if decision.delete_job:
        await api.delete_children(namespace, name)
        await api.delete_job(namespace, name)
