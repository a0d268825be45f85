"""kopf handlers for QuantizeJob: its watches, and one call into the reconcile contract
(operator/controllers/reconcile.py); the decision is `decide` in builders/quantizejob_status.py.

The Job (build: builders/quantizejob.py) and its pod come from kopf indexes, whose watch events
wake the job's daemon. The Job has the QuantizeJob's name (creating it twice is AlreadyExists) and
the serveAfter InferenceService is server-side applied, so every step is safe to repeat after a
kill. A finished job costs one pass per operator start that reads two indexes and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import kopf

from lmforge.operator import clock
from lmforge.operator.api import constants as c
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import StatusModel
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus
from lmforge.operator.builders import quantizejob as build
from lmforge.operator.builders.quantizejob_status import (
    JobView,
    Observed,
    QuantizePod,
    decide,
)
from lmforge.operator.controllers import reconcile
from lmforge.operator.decision import Apply, Decision
from lmforge.operator.kube import QUANTIZEJOBS, Object, Resource

PLURAL = "quantizejobs"
INTERVAL = float(os.environ.get("LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS", "3"))
OWNED: dict[str, Any] = {c.LABEL_KIND: build.KIND, build.LABEL_QUANTIZEJOB: kopf.PRESENT}


def build_config_from_env() -> build.BuildConfig:
    """LMFORGE_RUNTIME_IMAGE: the pod image; LMFORGE_WORKER_SERVICE_ACCOUNT: its ServiceAccount (it
    needs `patch` on pods to put its result on itself, as TrainJob workers do with their progress)."""
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        service_account=os.environ.get("LMFORGE_WORKER_SERVICE_ACCOUNT") or None,
    )


@dataclass(slots=True)
class JobMemory(reconcile.Memory):
    served: bool = False  # the serveAfter InferenceService was applied by this process


@dataclass(slots=True, kw_only=True)
class QuantizeJobs(reconcile.Kind[Observed, QuantizeJobStatus, JobMemory]):
    resource: ClassVar[Resource] = QUANTIZEJOBS
    status_model: ClassVar[type[StatusModel]] = QuantizeJobStatus
    cfg: build.BuildConfig

    def new_memory(self) -> JobMemory:
        return JobMemory()

    async def observe(self, obj: Object, memory: JobMemory, indexes: Mapping[str, kopf.Index]) -> Observed:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        spec = QuantizeJobSpec.model_validate(obj.get("spec") or {})
        ref = build.JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        return Observed(
            name=meta["name"],
            generation=meta.get("generation") or 0,
            spec=spec,
            status=QuantizeJobStatus.model_validate(obj.get("status") or {}),
            job=next(iter(indexes["jobs"].get(key, ())), None),
            pods=tuple(indexes["pods"].get(key, ())),
            now=clock.now(),
            job_object=build.job(ref, spec, dict(meta.get("annotations") or {}), self.cfg),
            serve_object=build.inference_service(ref, spec),
            served=memory.served,
            interval=INTERVAL,
        )

    def decide(self, observed: Observed) -> Decision[QuantizeJobStatus]:
        return decide(observed)

    def refused(
        self, obj: Object, observed: Observed, refusal: reconcile.Refusal
    ) -> Decision[QuantizeJobStatus] | None:
        """422 (e.g. a passed-through volume the API server refuses): not worth retrying."""
        if refusal.error.status != 422:
            return None
        message = r.MessageOwnedObjectRefused.format(error=refusal.error)
        return self.invalid(obj, message, observed.now)

    def acted(self, memory: JobMemory, observed: Observed, decision: Decision[QuantizeJobStatus]) -> None:
        if any(isinstance(action, Apply) for action in decision.actions):
            memory.served = True


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="quantizejob-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    kind = QuantizeJobs(cfg=build_config_from_env())
    await kind.connect()
    memo.quantizejob = kind


@kopf.on.cleanup(id="quantizejob-runtime-close")
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    kind: QuantizeJobs | None = getattr(memo, "quantizejob", None)
    if kind is not None:
        await kind.close()


# The indexes double as wake-up signals: kopf calls indexers on every watch event, in the event
# loop (they are async: asyncio.Event is not thread-safe).


@kopf.index("batch", "v1", "jobs", labels=OWNED)
async def quantizejob_jobs(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> dict:
    """(namespace, QuantizeJob name) -> its Job."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.quantizejob.wake(namespace, labels[build.LABEL_QUANTIZEJOB])
    return {(namespace, labels[build.LABEL_QUANTIZEJOB]): JobView.from_job(body)}


@kopf.index("pods", labels=OWNED)
async def quantizejob_pods(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> dict:
    """(namespace, QuantizeJob name) -> its pod(s)."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.quantizejob.wake(namespace, labels[build.LABEL_QUANTIZEJOB])
    return {(namespace, labels[build.LABEL_QUANTIZEJOB]): QuantizePod.from_pod(body)}


@kopf.index(c.GROUP, c.VERSION, PLURAL)
async def quantizejob_generations(
    *, namespace: str | None, name: str, meta: Mapping[str, Any], memo: Any, **_: Any
) -> dict:
    """(namespace, name) -> metadata.generation; a new one wakes the daemon."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.quantizejob.saw_generation(namespace, name, meta.get("generation"))
    return {(namespace, name): meta.get("generation")}


@kopf.daemon(c.GROUP, c.VERSION, PLURAL, id="quantizejob", cancellation_timeout=10.0)
async def quantizejob_daemon(
    *, body: kopf.Body, stopped: kopf.DaemonStopped, memo: Any, logger: kopf.Logger, **kwargs: Any
) -> None:
    """One per QuantizeJob; kopf passes the indexes by name."""
    indexes = {"jobs": kwargs["quantizejob_jobs"], "pods": kwargs["quantizejob_pods"]}
    await reconcile.run(memo.quantizejob, body, stopped, indexes, logger)
