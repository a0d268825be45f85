"""kopf handlers for InferenceService: apply on spec changes, observe + autoscale on a timer.

- create/update/resume: validate -> build (operator/builders/inferenceservice.py) -> server-side
  apply of the Deployment, the Service and the PodDisruptionBudget (idempotent: applying twice is
  a no-op) -> status.observedGeneration/url/selector -> an Event.
- a timer every INTERVAL seconds: status from the Deployment and its pods (kopf indexes: no LIST
  per pass) via `reflect`; then, with autoscaling, scrape the READY pods' /metrics, `decide`, and
  patch the Deployment's /scale; without autoscaling, put back spec.replicas if someone scaled the
  Deployment itself. One status patch (only the fields that changed), then the Events.

Apply and observe of one object never interleave (a per-object lock), and the timer skips a pass
while the object's generation is not applied yet, so a stale view never undoes a spec change.
Every REAPPLY_SECONDS the timer server-side applies the owned objects again (keeping the
Deployment's current size): a no-op unless someone edited or deleted one of them, which is then
put back.
The scrape history lives in this process only (see operator/autoscaler.py for why that is safe);
it starts over when the Deployment's size changes under the autoscaler (kubectl scale, a spec
change, a wake from zero).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from lmforge.operator import autoscaler, metrics_scraper
from lmforge.operator.api import constants as c
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders import inferenceservice as build
from lmforge.operator.builders.inferenceservice_status import (
    DeploymentView,
    ServingPod,
    StatusEvent,
    record_autoscaling,
    reflect,
    set_condition,
)
from lmforge.operator.controllers.bodies import plain
from lmforge.operator.kube import DEPLOYMENTS, POD_DISRUPTION_BUDGETS, ApiError, ControllerRuntime

PLURAL = "inferenceservices"
INTERVAL = float(os.environ.get("LMFORGE_AUTOSCALER_INTERVAL_SECONDS", "5"))
AUTOSCALING_STATUS_REFRESH = 30.0  # rewrite status.autoscaling without a change at most this often
REAPPLY_SECONDS = 60.0  # re-apply the owned objects this often (drift back to the desired state)
FIELD_MANAGER = "lmforge-operator"
AUTOSCALER_MANAGER = "lmforge-autoscaler"
OWNED = {build.LABEL_INFERENCESERVICE: kopf.PRESENT}
ReasonInvalidSpec = "InvalidSpec"


def build_config_from_env() -> build.BuildConfig:
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        cluster_domain=os.environ.get("LMFORGE_CLUSTER_DOMAIN", "cluster.local"),
        nccl_env=build.nccl_env_from(os.environ),
    )


@dataclass(slots=True)
class Handle:
    """This process's memory of one InferenceService."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    applied_generation: int | None = None
    history: tuple[autoscaler.Scrape, ...] = ()
    expected: tuple[int, float] | None = (
        None  # (replicas we set, monotonic deadline for the watch to show it)
    )
    size: int | None = None  # the Deployment size the autoscaler last saw or set
    autoscaling_written: float = 0.0  # monotonic time of the last status.autoscaling write
    applied_at: float = 0.0  # monotonic time of the last apply of the owned objects


@dataclass(slots=True)
class Runtime(ControllerRuntime):
    cfg: build.BuildConfig
    handles: dict[tuple[str, str], Handle] = field(default_factory=dict)
    session: Any = None  # aiohttp.ClientSession, opened on first scrape

    def handle(self, namespace: str, name: str) -> Handle:
        return self.handles.setdefault((namespace, name), Handle())

    def http(self) -> Any:
        import aiohttp

        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
        return self.session


def _now() -> datetime:
    return datetime.now(UTC)


def _post(body: Any, events: list[StatusEvent] | tuple[StatusEvent, ...]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])


def _patch_status(patch: kopf.Patch, old: InferenceServiceStatus, new: InferenceServiceStatus) -> None:
    """Only the top-level fields that changed: a merge patch never undoes a field someone else wrote."""
    before, after = old.to_k8s(), new.to_k8s()
    for key, value in after.items():
        if before.get(key) != value:
            patch.status[key] = value


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="inferenceservice-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    runtime = Runtime(cfg=build_config_from_env())
    await runtime.connect()
    memo.inferenceservice = runtime


@kopf.on.cleanup(id="inferenceservice-cleanup")
async def _shutdown(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "inferenceservice", None)
    if runtime is None:
        return
    if runtime.session is not None:
        await runtime.session.close()
    await runtime.close()


@kopf.index("pods", labels=OWNED)
def inferenceservice_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    """(namespace, InferenceService name) -> its server pods, kept current by the pod watch."""
    return {(namespace, labels[build.LABEL_INFERENCESERVICE]): ServingPod.from_pod(body)}


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def inferenceservice_deployments(
    namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict:
    return {(namespace, labels[build.LABEL_INFERENCESERVICE]): DeploymentView.from_deployment(body)}


@kopf.on.resume(c.GROUP, c.VERSION, PLURAL, id="inferenceservice-apply")
@kopf.on.create(c.GROUP, c.VERSION, PLURAL, id="inferenceservice-apply")
@kopf.on.update(c.GROUP, c.VERSION, PLURAL, id="inferenceservice-apply")
async def apply(
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    name: str,
    uid: str,
    reason: str,
    diff: kopf.Diff,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger,
    **_: Any,
) -> None:
    runtime: Runtime = memo.inferenceservice
    handle = runtime.handle(namespace, name)
    generation = meta.get("generation")
    status = InferenceServiceStatus.model_validate(plain(body.get("status")) or {})
    ref = build.ServiceRef(name=name, namespace=namespace, uid=uid)
    try:
        spec = InferenceServiceSpec.model_validate(plain(body.get("spec")) or {})
        location = build.model_location(spec)
    except ValueError as exc:  # a CRD older/newer than this operator, or a source without a loader
        _reject(body, patch, status, generation, str(exc), logger)
        return
    replicas_changed = reason == "create" or any(tuple(d[1]) == ("spec", "replicas") for d in diff or ())
    async with handle.lock:
        api = runtime.api
        try:
            existing = await api.get(DEPLOYMENTS, namespace, name)
            current = None if existing is None else existing.get("spec", {}).get("replicas")
            replicas = build.replicas_to_apply(spec, current, replicas_changed)
            pdb = await apply_owned(runtime, ref, spec, replicas)
        except Exception as exc:  # noqa: BLE001 - API errors, connection errors: retried
            if (
                isinstance(exc, ApiError) and exc.status == 422
            ):  # e.g. a passed-through volume the server refuses
                _reject(
                    body,
                    patch,
                    status,
                    generation,
                    f"the API server refused an owned object: {exc.message}",
                    logger,
                )
                return
            raise kopf.TemporaryError(f"applying the owned objects failed: {exc}", delay=10) from exc
        handle.applied_generation, handle.applied_at = generation, time.monotonic()
        if current != replicas:
            handle.expected = (replicas, time.monotonic() + 3 * INTERVAL)
    new = status.model_copy(
        update={
            "observed_generation": generation,
            "url": build.url(name, namespace, runtime.cfg),
            "selector": build.selector(name),
        }
    )
    if status.phase == "Failed" and any(cond.reason == ReasonInvalidSpec for cond in status.conditions):
        new = new.model_copy(update={"phase": "Pending"})
    _patch_status(patch, status, new)
    if reason != "resume":
        parts = "Deployment, Service" + (" and PodDisruptionBudget" if pdb else "")
        _post(
            body,
            [
                StatusEvent(
                    "Normal",
                    "Applied",
                    f"applied {parts} for generation {generation} ({replicas} replica(s))",
                ),
                *(StatusEvent("Normal", "ModelFromHub", note) for note in location.notes),
            ],
        )


async def apply_owned(
    runtime: Runtime, ref: build.ServiceRef, spec: InferenceServiceSpec, replicas: int
) -> dict[str, Any] | None:
    """Server-side apply of the Deployment (at `replicas`), the Service and the PDB (or its
    deletion when at most one replica can exist). Returns the PDB applied, if any."""
    api = runtime.api
    await api.apply(build.deployment(ref, spec, replicas, runtime.cfg), FIELD_MANAGER)
    await api.apply(build.service(ref), FIELD_MANAGER)
    pdb = build.pod_disruption_budget(ref, spec)
    await (
        api.apply(pdb, FIELD_MANAGER) if pdb else api.delete(POD_DISRUPTION_BUDGETS, ref.namespace, ref.name)
    )
    return pdb


def _reject(
    body: kopf.Body,
    patch: kopf.Patch,
    status: InferenceServiceStatus,
    generation: int | None,
    message: str,
    logger: logging.Logger,
) -> None:
    logger.error("invalid InferenceService: %s", message)
    conditions = set_condition(
        status.conditions,
        "Ready",
        "False",
        ReasonInvalidSpec,
        message[:1024],
        _now().replace(microsecond=0),
        generation,
    )
    _patch_status(
        patch,
        status,
        status.model_copy(
            update={"phase": "Failed", "conditions": conditions, "observed_generation": generation}
        ),
    )
    _post(body, [StatusEvent("Warning", ReasonInvalidSpec, message)])


@kopf.on.delete(c.GROUP, c.VERSION, PLURAL, id="inferenceservice-forget", optional=True)
def _forget(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """The owned objects go with the garbage collector (owner references); only our memory stays."""
    memo.inferenceservice.handles.pop((namespace, name), None)


@kopf.timer(c.GROUP, c.VERSION, PLURAL, id="inferenceservice-observe", interval=INTERVAL)
async def observe(
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    name: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger,
    inferenceservice_pods: kopf.Index,
    inferenceservice_deployments: kopf.Index,
    **_: Any,
) -> None:
    runtime: Runtime = memo.inferenceservice
    if (namespace, name) in runtime.released:
        return  # its namespace is being deleted and kopf no longer watches it
    handle = runtime.handle(namespace, name)
    if handle.applied_generation != meta.get("generation"):
        return  # the apply handler has not (yet) applied what this body says
    try:
        spec = InferenceServiceSpec.model_validate(plain(body.get("spec")) or {})
    except ValueError:
        return  # the apply handler reported it
    previous = InferenceServiceStatus.model_validate(plain(body.get("status")) or {})
    key = (namespace, name)
    deployment = next(iter(inferenceservice_deployments.get(key, ())), None)
    pods = list(inferenceservice_pods.get(key, ()))
    now = _now()
    async with handle.lock:
        if time.monotonic() - handle.applied_at >= REAPPLY_SECONDS:  # put back what someone changed
            size = (
                deployment.replicas if deployment is not None else build.replicas_to_apply(spec, None, False)
            )
            try:
                await apply_owned(
                    runtime, build.ServiceRef(name=name, namespace=namespace, uid=meta["uid"]), spec, size
                )
            except Exception as exc:  # noqa: BLE001 - retried at the next pass
                logger.warning("re-applying the owned objects failed: %s", exc)
            else:
                handle.applied_at = time.monotonic()
        reflection = reflect(name, spec, previous, deployment, pods, now.replace(microsecond=0))
        status, events = reflection.status, list(reflection.events)
        if deployment is not None:
            current = _current_replicas(handle, deployment)
            if spec.autoscaling is None:
                if current != spec.replicas:
                    await _scale(runtime, handle, namespace, name, spec.replicas, FIELD_MANAGER)
                    events.append(
                        StatusEvent(
                            "Normal",
                            "ReplicasRestored",
                            f"the Deployment had {current} replica(s): back to spec.replicas "
                            f"{spec.replicas} (scale the InferenceService, not its Deployment)",
                        )
                    )
            else:
                status, event = await _autoscale(
                    runtime, handle, namespace, name, spec, body, status, pods, current, now, logger
                )
                events += [event] if event else []
    _patch_status(patch, previous, status)
    _post(body, events)


def _current_replicas(handle: Handle, deployment: DeploymentView) -> int:
    """The Deployment's size, or what we just set it to while the watch has not shown it yet."""
    if handle.expected is not None:
        replicas, deadline = handle.expected
        if deployment.replicas == replicas or time.monotonic() > deadline:
            handle.expected = None
        else:
            return replicas
    return deployment.replicas


async def _scale(
    runtime: Runtime, handle: Handle, namespace: str, name: str, replicas: int, manager: str
) -> None:
    await runtime.api.scale(DEPLOYMENTS, namespace, name, replicas, manager)
    handle.expected = (replicas, time.monotonic() + 3 * INTERVAL)


async def _autoscale(
    runtime: Runtime,
    handle: Handle,
    namespace: str,
    name: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    status: InferenceServiceStatus,
    pods: list[ServingPod],
    current: int,
    now: datetime,
    logger: logging.Logger,
) -> tuple[InferenceServiceStatus, StatusEvent | None]:
    policy = spec.autoscaling
    assert policy is not None
    if handle.size is not None and current != handle.size:
        # sized by someone else (kubectl scale, a wake from zero, a spec change): recommendations
        # made for the old size say nothing about the new one, so the windows start over
        handle.history = ()
    handle.size = current
    template = (body.get("metadata", {}).get("annotations") or {}).get(build.ANNOTATION_METRICS_URL)
    ready = [p for p in pods if p.serving]
    urls = {
        p.name: metrics_scraper.metrics_url(template, pod=p.name, ip=p.ip, namespace=namespace, name=name)
        for p in ready
    }
    samples = await metrics_scraper.scrape({pod: url for pod, url in urls.items() if url}, runtime.http())
    answered = {pod: sample for pod, sample in samples.items() if sample is not None}
    scrape = autoscaler.Scrape(
        time=now,
        replicas=current,
        pods=answered,
        not_ready=sum(1 for p in pods if p.active and not p.serving),
        missing=len(ready) - len(answered),
    )
    handle.history = autoscaler.prune((*handle.history, scrape), policy, now)
    decision = autoscaler.decide(handle.history, current, policy, now, spec.engine.max_num_seqs)
    stamp = now.replace(microsecond=0)
    if decision.changed:
        try:
            await _scale(runtime, handle, namespace, name, decision.replicas, AUTOSCALER_MANAGER)
        except Exception as exc:  # noqa: BLE001 - API or connection error; retried next pass
            logger.warning("scaling to %d failed: %s", decision.replicas, exc)
            return status, None
        handle.size = decision.replicas
        logger.info("autoscaler: %s", decision.reason)
    previous = status.autoscaling
    fresh = (
        decision.changed
        or previous is None
        or previous.desired_replicas != decision.recommendation
        or time.monotonic() - handle.autoscaling_written >= AUTOSCALING_STATUS_REFRESH
    )
    if not fresh:
        return status, None
    handle.autoscaling_written = time.monotonic()
    return record_autoscaling(
        status,
        desired=decision.recommendation,
        metric_value=decision.metric_value,
        reason=decision.reason,
        scaled_from=current if decision.changed else None,
        scaled_to=decision.replicas if decision.changed else None,
        now=stamp,
    )
