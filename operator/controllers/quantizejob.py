"""kopf handlers for QuantizeJob: observe -> `decide` (operator/builders/quantizejob_status.py) ->
act -> one status patch -> Events.

A timer per QuantizeJob (every INTERVAL seconds, the first at once) is the whole loop: it reads the
Job and its pod from kopf indexes (no LIST per pass), decides, creates the Job (build:
operator/builders/quantizejob.py) or applies the serveAfter InferenceService, then patches only the
status fields that changed. Acting before writing makes every step safe to repeat: the Job has the
QuantizeJob's name (AlreadyExists is success) and the InferenceService is server-side applied, so an
operator killed between the two does the same again on its next pass. A finished job costs a pass
that reads two indexes and writes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from lmforge.operator.api import constants as c
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus
from lmforge.operator.builders import quantizejob as build
from lmforge.operator.builders.quantizejob_status import (
    JobView,
    Observed,
    QuantizePod,
    decide,
    invalid,
)
from lmforge.operator.controllers.bodies import plain
from lmforge.operator.kube import ApiError, ControllerRuntime

PLURAL = "quantizejobs"
INTERVAL = float(os.environ.get("LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS", "3"))
FIELD_MANAGER = "lmforge-operator"
OWNED = {c.LABEL_KIND: build.KIND, build.LABEL_QUANTIZEJOB: kopf.PRESENT}


def build_config_from_env() -> build.BuildConfig:
    """LMFORGE_RUNTIME_IMAGE: the pod image; LMFORGE_WORKER_SERVICE_ACCOUNT: its ServiceAccount (it
    needs `patch` on pods to put its result on itself, as TrainJob workers do with their progress)."""
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        service_account=os.environ.get("LMFORGE_WORKER_SERVICE_ACCOUNT") or None,
    )


@dataclass(slots=True)
class Runtime(ControllerRuntime):
    cfg: build.BuildConfig


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="quantizejob-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    runtime = Runtime(cfg=build_config_from_env())
    await runtime.connect()
    memo.quantizejob = runtime


@kopf.on.cleanup(id="quantizejob-runtime-close")
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "quantizejob", None)
    if runtime is not None:
        await runtime.close()


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def quantizejob_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    """(namespace, QuantizeJob name) -> its Job."""
    return {(namespace, labels[build.LABEL_QUANTIZEJOB]): JobView.from_job(body)}


@kopf.index("pods", labels=OWNED)
def quantizejob_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    """(namespace, QuantizeJob name) -> its pod(s)."""
    return {(namespace, labels[build.LABEL_QUANTIZEJOB]): QuantizePod.from_pod(body)}


@kopf.timer(c.GROUP, c.VERSION, PLURAL, id="quantizejob", interval=INTERVAL)
async def reconcile(
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    name: str,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger,
    quantizejob_jobs: kopf.Index,
    quantizejob_pods: kopf.Index,
    **_: Any,
) -> None:
    runtime: Runtime = memo.quantizejob
    if meta.get("deletionTimestamp") or (namespace, name) in runtime.released:
        return
    generation = meta.get("generation") or 0
    status = QuantizeJobStatus.model_validate(plain(body.get("status")) or {})
    ref = build.JobRef(name=name, namespace=namespace, uid=uid)
    try:
        spec = QuantizeJobSpec.model_validate(plain(body.get("spec")) or {})
        job = build.job(ref, spec, dict(meta.get("annotations") or {}), runtime.cfg)
        isvc = build.inference_service(ref, spec)
    except ValueError as exc:  # a CRD older/newer than this operator, or a location the pod cannot use
        logger.error("invalid QuantizeJob: %s", exc)
        decision = invalid(status, generation, str(exc), _now())
    else:
        key = (namespace, name)
        observed = Observed(
            name=name,
            generation=generation,
            spec=spec,
            status=status,
            job=next(iter(quantizejob_jobs.get(key, ())), None),
            pods=tuple(quantizejob_pods.get(key, ())),
            now=_now(),
        )
        decision = decide(observed)
        try:
            if decision.create_job:
                await runtime.api.create(job)  # None when it exists: same name, same job
            if decision.serve and isvc is not None:
                await runtime.api.apply(isvc, FIELD_MANAGER)
        except ApiError as exc:
            if exc.status == 422:  # e.g. a passed-through volume the API server refuses: not worth retrying
                decision = invalid(
                    status, generation, f"the API server refused an owned object: {exc}", _now()
                )
            else:
                raise kopf.TemporaryError(
                    f"creating the owned objects failed: {exc}", delay=INTERVAL
                ) from exc
    before, after = status.to_k8s(), decision.status.to_k8s()
    for key, value in after.items():  # a merge patch of what changed: never undoes someone else's field
        if before.get(key) != value:
            patch.status[key] = value
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
