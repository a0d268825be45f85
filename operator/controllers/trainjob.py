"""kopf handlers for TrainJob: observe -> `decide` -> write status -> Events -> act.

One kopf daemon per TrainJob runs the level-based loop, so reconciles of one job never overlap.
It wakes on any event of the job's pods (an index keeps them in memory: no LIST per reconcile),
on spec changes of the job, and every `requeue_after` seconds otherwise. Everything it needs is
in the cluster (status + pods), so an operator killed at any moment resumes where it stopped:

- the status is written first, with the job's resourceVersion (PUT): a decision taken on a stale
  view fails with 409 Conflict and is taken again on a fresh read;
- pods, the Service and the ConfigMap have fixed names: AlreadyExists is success, NotFound on
  delete is success;
- the ConfigMap (train.json) and the Service are server-side applied whenever the job's generation
  is new to this process and before every gang start, so the next gang always reads this spec;
  status.observedGeneration moves only after that (and only while no pod of an older spec runs);
- a worker pod the API server refuses (403: a missing ServiceAccount or RBAC; 404; 422) sets
  Created=False naming the cause, with one Event per cause, and is retried quietly.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from lmforge.operator.api import constants as c
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders import trainjob as build
from lmforge.operator.builders.trainjob_policy import Decision, Observed, WorkerPod, creation_failed, decide
from lmforge.operator.controllers.bodies import plain
from lmforge.operator.kube import CONFIG_MAPS, PODS, SERVICES, TRAINJOBS, ApiError, ControllerRuntime, KubeApi

PLURAL = "trainjobs"
COALESCE_SECONDS = 0.2  # pods of a gang change together: one reconcile for the burst
REFUSED_RETRY_SECONDS = 5.0  # a refused worker pod (missing ServiceAccount, ...): try again this often
FIELD_MANAGER = "lmforge-operator"
REFUSALS = (403, 404, 422)  # answers to a pod creation that retrying alone will not fix
POD_LABELS = {c.LABEL_KIND: "TrainJob", c.LABEL_JOB_NAME: kopf.PRESENT}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def build_config_from_env() -> build.BuildConfig:
    """LMFORGE_RUNTIME_IMAGE: the default worker image; LMFORGE_WORKER_SERVICE_ACCOUNT: the
    workers' ServiceAccount (it needs `patch` on pods for the progress annotation)."""
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        service_account=os.environ.get("LMFORGE_WORKER_SERVICE_ACCOUNT") or None,
    )


@dataclass(slots=True)
class JobHandle:
    """Per-job memory of this process: how to wake its daemon, and the newest copy of the job
    we know of (our own status write may be newer than the watch has delivered yet)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    latest: dict[str, Any] | None = None
    generation: int | None = None
    applied_generation: int | None = None  # the ConfigMap and Service were applied for this generation


class PodRefused(Exception):
    """The API server refused a worker pod with one of REFUSALS."""

    def __init__(self, pod: str, error: ApiError) -> None:
        super().__init__(f"{pod}: {error}")
        self.pod, self.error = pod, error


@dataclass(slots=True)
class Runtime(ControllerRuntime):
    cfg: build.BuildConfig
    handles: dict[tuple[str, str], JobHandle] = field(default_factory=dict)

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


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="trainjob-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    runtime = Runtime(cfg=build_config_from_env())
    await runtime.connect()
    memo.trainjob = runtime


@kopf.on.cleanup(id="trainjob-runtime-close")
async def _cleanup_runtime(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "trainjob", None)
    if runtime is not None:
        await runtime.close()


# The two indexes double as wake-up signals: kopf calls indexers on every watch event, in the
# event loop (they are async), and logs them tersely, unlike on.event handlers (a line per event).


@kopf.index("pods", labels=POD_LABELS)
async def trainjob_pods(
    namespace: str, labels: Mapping[str, str], body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict:
    """(namespace, job name) -> the job's worker pods, kept current by the pod watch."""
    job = labels[c.LABEL_JOB_NAME]
    memo.trainjob.wake(namespace, job)
    pod = WorkerPod.from_pod(body)
    return {(namespace, job): pod} if pod else {}


@kopf.index(c.GROUP, c.VERSION, PLURAL)
async def trainjob_generations(
    namespace: str, name: str, meta: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> dict:
    """(namespace, name) -> metadata.generation. A new generation (suspend flips, TTL edits) wakes
    the job's daemon at once; our own status writes do not."""
    generation = meta.get("generation")
    handle = memo.trainjob.handles.get((namespace, name))
    if handle is not None and generation != handle.generation:
        handle.generation = generation
        handle.wake.set()
    return {(namespace, name): generation}


@kopf.daemon(c.GROUP, c.VERSION, PLURAL, id="trainjob", cancellation_timeout=10.0)
async def trainjob_daemon(
    body: kopf.Body,
    namespace: str,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    trainjob_pods: kopf.Index,
    logger: logging.Logger,
    **_: Any,
) -> None:
    runtime: Runtime = memo.trainjob
    handle = runtime.handle(namespace, name)
    handle.generation = body.get("metadata", {}).get("generation")
    failures = 0
    try:
        while not stopped:
            handle.wake.clear()
            try:
                delay = await reconcile(runtime, handle, body, trainjob_pods, logger)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - API errors, quota, invalid user volumes: retry, visibly
                failures += 1
                delay = min(2.0**failures, 60.0)
                logger.warning("reconcile failed (retry in %.0fs): %s", delay, exc)
                kopf.event(plain(body), type="Warning", reason="ReconcileError", message=str(exc)[:1024])
            if delay is None:
                return  # finished and nothing left to do: the daemon (and its finalizer) go away
            if delay > 0 and await _sleep(handle.wake, stopped, delay):
                await asyncio.sleep(COALESCE_SECONDS)  # let a burst of pod events land before looking
    finally:
        runtime.handles.pop((namespace, name), None)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> bool:
    """Sleep until woken, stopped or `seconds` passed; True if woken by an event."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return wake.is_set() and not stopped


@kopf.on.delete(c.GROUP, c.VERSION, PLURAL, id="trainjob-cleanup", optional=True)
async def _cleanup(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await delete_children(memo.trainjob.api, namespace, name)


# --- one reconcile ----------------------------------------------------------------------------------


async def reconcile(
    runtime: Runtime, handle: JobHandle, body: kopf.Body, pods_index: kopf.Index, logger: logging.Logger
) -> float | None:
    """One observe/decide/act pass. Returns seconds until the next pass (0: at once), or None
    when the job is finished and nothing is left to watch."""
    live = plain(body)
    job = handle.latest if _resource_version(handle.latest) > _resource_version(live) else live
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if (namespace, name) in runtime.released:
        return None  # its namespace is being deleted and kopf no longer watches it
    if meta.get("deletionTimestamp"):
        return 5.0  # kopf stops the daemon and runs the cleanup handler
    try:
        spec = TrainJobSpec.model_validate(job.get("spec") or {})
    except ValueError as exc:  # the CRD in the cluster is older or newer than this operator
        logger.error("invalid TrainJob spec: %s", exc)
        kopf.event(job, type="Warning", reason="InvalidSpec", message=str(exc)[:1024])
        return 300.0
    status = TrainJobStatus.model_validate(job.get("status") or {})
    generation = meta.get("generation", 0)
    api = runtime.api
    finished = status.phase in c.TERMINAL_PHASES
    observed = Observed(
        name=name,
        generation=generation,
        spec=spec,
        status=status,
        pods=tuple(pods_index.get((namespace, name), ())),
        now=now_utc(),
        spec_hash=build.gang_spec_hash(spec),
        children_applied=finished or handle.applied_generation == generation,
    )
    decision = decide(observed)

    if decision.status != status:
        try:
            handle.latest = await api.replace_status({**job, "status": decision.status.to_k8s()})
        except ApiError as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:  # someone (the user, or our own last write) changed it: decide again
                handle.latest = await api.get(TRAINJOBS, namespace, name)
                return 0.0 if handle.latest else None
            raise
    for event in decision.events:
        kopf.event(job, type=event.type, reason=event.reason, message=event.message)
    requeue_now = False
    if not finished and not decision.delete_job and handle.applied_generation != generation:
        # after the status write (a stale view never reaches here) and before observedGeneration
        # says so (the next pass, at once, writes it)
        await apply_children(
            api, build.JobRef(name=name, namespace=namespace, uid=meta["uid"]), spec, runtime.cfg
        )
        handle.applied_generation, requeue_now = generation, True
    try:
        await _act(api, runtime.cfg, job, spec, decision, children_applied=requeue_now)
    except PodRefused as refused:
        await _record_refusal(runtime, handle, job, generation, refused, logger)
        return REFUSED_RETRY_SECONDS
    if decision.delete_job:
        return None
    if requeue_now:
        return 0.0
    finished = decision.status.phase in c.TERMINAL_PHASES
    settled = all(not p.active and not p.deleting for p in observed.pods)  # only finished pods, kept for logs
    idle = settled and not (decision.delete_pods or decision.force_delete_pods)
    if finished and spec.ttl_seconds_after_finished is None and idle:
        return None
    return decision.requeue_after


async def _record_refusal(
    runtime: Runtime,
    handle: JobHandle,
    job: dict[str, Any],
    generation: int,
    refused: PodRefused,
    logger: logging.Logger,
) -> None:
    """Created=False with the cause in the status, then the Event, only when the cause is new and
    the status write went through (kopf's own annotation patches race with it at creation: on 409
    the job is read again, so the Event is never posted twice for one cause)."""
    current = handle.latest if _resource_version(handle.latest) > _resource_version(job) else job
    for _ in range(3):
        status = TrainJobStatus.model_validate(current.get("status") or {})
        new, event = creation_failed(
            status,
            generation,
            now_utc(),
            refused.pod,
            refused.error.status,
            refused.error.message,
            runtime.cfg.service_account,
            job["metadata"]["namespace"],
        )
        if new == status:
            return
        try:
            handle.latest = await runtime.api.replace_status({**current, "status": new.to_k8s()})
        except ApiError as exc:
            if exc.status != 409:
                if exc.status == 404:
                    return
                raise
            fresh = await runtime.api.get(TRAINJOBS, job["metadata"]["namespace"], job["metadata"]["name"])
            if fresh is None:
                return
            current = handle.latest = fresh
            continue
        if event is not None:
            logger.warning("worker pod refused: %s", event.message)
            kopf.event(job, type=event.type, reason=event.reason, message=event.message)
        return


async def apply_children(api: KubeApi, ref: build.JobRef, spec: TrainJobSpec, cfg: build.BuildConfig) -> None:
    """Server-side apply of the Service and the ConfigMap: they hold this spec afterwards, whatever
    an older spec (or a person) left in them."""
    await asyncio.gather(
        api.apply(build.headless_service(ref, cfg), FIELD_MANAGER),
        api.apply(build.config_map(ref, spec), FIELD_MANAGER),
    )


async def _act(
    api: KubeApi,
    cfg: build.BuildConfig,
    job: dict[str, Any],
    spec: TrainJobSpec,
    decision: Decision,
    children_applied: bool = False,
) -> None:
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ref = build.JobRef(name=name, namespace=namespace, uid=meta["uid"])
    await asyncio.gather(
        *(api.delete(PODS, namespace, pod, grace_period_seconds=0) for pod in decision.force_delete_pods)
    )
    await asyncio.gather(*(api.delete(PODS, namespace, pod) for pod in decision.delete_pods))
    if decision.create_ranks:  # all at once: a pod waits for its ConfigMap in the kubelet, not here
        if not children_applied:  # the gang reads exactly this spec's train.json
            await apply_children(api, ref, spec, cfg)
        pods = build.gang(ref, spec, decision.status.restarts, list(decision.create_ranks), cfg)
        results = await asyncio.gather(*(api.create(pod) for pod in pods), return_exceptions=True)
        for pod, result in zip(pods, results, strict=True):  # rank order: the first refusal is reported
            if isinstance(result, ApiError) and result.status in REFUSALS:
                raise PodRefused(pod["metadata"]["name"], result)
        for result in results:
            if isinstance(result, BaseException):
                raise result
    if decision.delete_job:
        await delete_children(api, namespace, name)
        await api.delete(TRAINJOBS, namespace, name)


async def delete_children(api: KubeApi, namespace: str, job_name: str) -> None:
    """The job's pods, Service and ConfigMap, explicitly: the garbage collector may lag behind
    (or be absent). What is already gone counts as deleted."""
    selector = f"{c.LABEL_JOB_NAME}={job_name},{c.LABEL_KIND}=TrainJob"
    await asyncio.gather(
        api.delete_collection(PODS, namespace, selector),
        api.delete(SERVICES, namespace, job_name),
        api.delete(CONFIG_MAPS, namespace, build.config_map_name(job_name)),
    )
