"""kopf handlers for TrainJob: its watches, and one call into the reconcile contract
(operator/controllers/reconcile.py); the decision is `decide` in builders/trainjob_policy.py.

The job's daemon wakes on any event of its pods (an index keeps them in memory: no LIST per
reconcile), on spec changes, and every `requeue_after` seconds otherwise. What the TrainJob adds
to the contract:

- the ConfigMap (train.json) and the Service are server-side applied whenever the job's generation
  is new to this process and before every gang start, so the next gang always reads this spec;
  status.observedGeneration moves only after that (and only while no pod of an older spec runs);
- a worker pod the API server refuses (403: a missing ServiceAccount or RBAC; 404; 422) sets
  Created=False naming the cause, with one Event per cause, and is retried quietly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import kopf

from lmforge.operator import clock
from lmforge.operator.api import constants as c
from lmforge.operator.api.base import StatusModel
from lmforge.operator.api.trainjob import TrainJobSpec, TrainJobStatus
from lmforge.operator.builders import trainjob as build
from lmforge.operator.builders.trainjob_pods import WorkerPod
from lmforge.operator.builders.trainjob_policy import (
    REFUSED_RETRY_SECONDS,
    Observed,
    creation_failed,
    decide,
    delete_children,
)
from lmforge.operator.controllers import reconcile
from lmforge.operator.decision import Create, Decision
from lmforge.operator.kube import TRAINJOBS, Object, Resource

PLURAL = "trainjobs"
POD_LABELS: dict[str, Any] = {c.LABEL_KIND: "TrainJob", c.LABEL_JOB_NAME: kopf.PRESENT}


def build_config_from_env() -> build.BuildConfig:
    """LMFORGE_RUNTIME_IMAGE: the default worker image; LMFORGE_WORKER_SERVICE_ACCOUNT: the
    workers' ServiceAccount (it needs `patch` on pods for the progress annotation)."""
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        service_account=os.environ.get("LMFORGE_WORKER_SERVICE_ACCOUNT") or None,
    )


@dataclass(slots=True, kw_only=True)
class TrainJobs(reconcile.Kind[Observed, TrainJobStatus, reconcile.Memory]):
    resource: ClassVar[Resource] = TRAINJOBS
    status_model: ClassVar[type[StatusModel]] = TrainJobStatus
    cfg: build.BuildConfig

    def new_memory(self) -> reconcile.Memory:
        return reconcile.Memory()

    async def observe(
        self, obj: Object, memory: reconcile.Memory, indexes: Mapping[str, kopf.Index]
    ) -> Observed:
        meta = obj["metadata"]
        spec = TrainJobSpec.model_validate(obj.get("spec") or {})
        status = TrainJobStatus.model_validate(obj.get("status") or {})
        generation = meta.get("generation", 0)
        return Observed(
            name=meta["name"],
            generation=generation,
            spec=spec,
            status=status,
            pods=tuple(indexes["pods"].get((meta["namespace"], meta["name"]), ())),
            now=clock.now(),
            spec_hash=build.gang_spec_hash(spec),
            children_applied=status.phase in c.TERMINAL_PHASES or memory.applied_generation == generation,
            namespace=meta["namespace"],
            uid=meta["uid"],
            cfg=self.cfg,
        )

    def decide(self, observed: Observed) -> Decision[TrainJobStatus]:
        return decide(observed)

    def refused(
        self, obj: Object, observed: Observed, refusal: reconcile.Refusal
    ) -> Decision[TrainJobStatus] | None:
        """A refused worker pod: Created=False naming the cause; its Event only when the cause is new."""
        if not isinstance(refusal.action, Create):
            return None
        status = TrainJobStatus.model_validate(obj.get("status") or {})
        new, event = creation_failed(
            status,
            observed.generation,
            observed.now,
            refusal.name,
            refusal.error.status,
            refusal.error.message,
            self.cfg.service_account,
            observed.namespace,
        )
        return Decision(new, events=(event,) if event else (), requeue_after=REFUSED_RETRY_SECONDS)


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="trainjob-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    kind = TrainJobs(cfg=build_config_from_env())
    await kind.connect()
    memo.trainjob = kind


@kopf.on.cleanup(id="trainjob-runtime-close")
async def _cleanup_runtime(memo: kopf.Memo, **_: Any) -> None:
    kind: TrainJobs | None = getattr(memo, "trainjob", None)
    if kind is not None:
        await kind.close()


# The two indexes double as wake-up signals: kopf calls indexers on every watch event, in the
# event loop (they are async), and logs them tersely, unlike on.event handlers (a line per event).


@kopf.index("pods", labels=POD_LABELS)
async def trainjob_pods(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> dict:
    """(namespace, job name) -> the job's worker pods, kept current by the pod watch."""
    namespace = namespace or ""  # namespaced kinds: always set
    job = labels[c.LABEL_JOB_NAME]
    memo.trainjob.wake(namespace, job)
    pod = WorkerPod.from_pod(body)
    return {(namespace, job): pod} if pod else {}


@kopf.index(c.GROUP, c.VERSION, PLURAL)
async def trainjob_generations(
    *, namespace: str | None, name: str, meta: Mapping[str, Any], memo: Any, **_: Any
) -> dict:
    """(namespace, name) -> metadata.generation. A new generation (suspend flips, TTL edits) wakes
    the job's daemon at once; our own status writes do not."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.trainjob.saw_generation(namespace, name, meta.get("generation"))
    return {(namespace, name): meta.get("generation")}


@kopf.daemon(c.GROUP, c.VERSION, PLURAL, id="trainjob", cancellation_timeout=10.0)
async def trainjob_daemon(
    *, body: kopf.Body, stopped: kopf.DaemonStopped, memo: Any, logger: kopf.Logger, **kwargs: Any
) -> None:
    """One per TrainJob; kopf passes the index `trainjob_pods` by name."""
    await reconcile.run(memo.trainjob, body, stopped, {"pods": kwargs["trainjob_pods"]}, logger)


@kopf.on.delete(c.GROUP, c.VERSION, PLURAL, id="trainjob-cleanup", optional=True)
async def _cleanup(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """The children, explicitly: the garbage collector may lag behind (or be absent)."""
    await reconcile.execute(memo.trainjob.api, tuple(delete_children(namespace or "", name)))
