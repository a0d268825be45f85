"""kopf handlers for InferenceService: its watches, and one call into the reconcile contract
(operator/controllers/reconcile.py); the decision is `decide` in builders/inferenceservice_policy.py.

The service's daemon wakes on every event of its Deployment and pods (kopf indexes: no LIST per
pass), on spec changes, and every INTERVAL seconds. What observe adds for this kind: with
autoscaling, every INTERVAL seconds it scrapes the READY pods' /metrics into a history that lives
in this process only (see operator/autoscaler.py for why that is safe); the history starts over
when the Deployment's size changes under the autoscaler (kubectl scale, a spec change, a wake from
zero). A size this process just set counts until the watch shows it (or 3 intervals pass), so a
lagging watch never undoes a scale.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import kopf

from lmforge.operator import adapter_sync, autoscaler, clock, metrics_scraper
from lmforge.operator.api import constants as c
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import StatusModel
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders import inferenceservice as build
from lmforge.operator.builders import inferenceservice_adapters as adapters
from lmforge.operator.builders.inferenceservice_policy import Observed, decide
from lmforge.operator.builders.inferenceservice_status import DeploymentView, ServingPod
from lmforge.operator.builders.storage import model_cache_from_env
from lmforge.operator.controllers import reconcile
from lmforge.operator.controllers.bodies import plain
from lmforge.operator.decision import AdapterCall, Apply, Decision, Scale, invalid_spec
from lmforge.operator.kube import INFERENCESERVICES, Object, Resource

PLURAL = "inferenceservices"
INTERVAL = float(os.environ.get("LMFORGE_AUTOSCALER_INTERVAL_SECONDS", "5"))
MODELS_TIMEOUT_SECONDS = 3.0  # GET /v1/models of one replica
LOAD_TIMEOUT_SECONDS = 30.0  # the engine reads and checks an adapter between two steps
AUTOSCALING_STATUS_REFRESH = 30.0  # rewrite status.autoscaling without a change at most this often
REAPPLY_SECONDS = 60.0  # re-apply the owned objects this often (drift back to the desired state)
OWNED: dict[str, Any] = {build.LABEL_INFERENCESERVICE: kopf.PRESENT}


def build_config_from_env() -> build.BuildConfig:
    return build.BuildConfig(
        default_image=os.environ.get("LMFORGE_RUNTIME_IMAGE", build.DEFAULT_IMAGE),
        cluster_domain=os.environ.get("LMFORGE_CLUSTER_DOMAIN", "cluster.local"),
        model_cache=model_cache_from_env(os.environ),  # Helm values modelCache
        nccl_env=build.nccl_env_from(os.environ),
    )


@dataclass(slots=True)
class ServiceMemory(reconcile.Memory):
    """This process's memory of one InferenceService (monotonic times)."""

    applied_spec_replicas: int | None = None  # spec.replicas at the last apply
    applied_replicas: int | None = None  # the Deployment size the last apply set
    applied_at: float = 0.0
    expected: tuple[int, float] | None = None  # (replicas we set, deadline for the watch to show it)
    size: int | None = None  # the Deployment size the autoscaler last saw or set
    history: tuple[autoscaler.Scrape, ...] = ()
    scraped_at: float = 0.0
    autoscaling_written: float = 0.0
    load_errors: dict[str, str] = field(default_factory=dict)  # adapter -> its last failed load


@dataclass(slots=True, kw_only=True)
class InferenceServices(reconcile.Kind[Observed, InferenceServiceStatus, ServiceMemory]):
    resource: ClassVar[Resource] = INFERENCESERVICES
    status_model: ClassVar[type[StatusModel]] = InferenceServiceStatus
    cfg: build.BuildConfig
    session: Any = None  # aiohttp.ClientSession, opened on first scrape

    def new_memory(self) -> ServiceMemory:
        return ServiceMemory()

    def http(self) -> Any:
        import aiohttp

        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
        return self.session

    async def observe(
        self, obj: Object, memory: ServiceMemory, indexes: Mapping[str, kopf.Index]
    ) -> Observed:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        spec = InferenceServiceSpec.model_validate(obj.get("spec") or {})
        location = build.model_location(spec, self.cfg)  # ValueError: a source without a reader
        status = InferenceServiceStatus.model_validate(obj.get("status") or {})
        deployment: DeploymentView | None = next(iter(indexes["deployments"].get(key, ())), None)
        pods: tuple[ServingPod, ...] = tuple(indexes["pods"].get(key, ()))
        now, tick = clock.precise_now(), time.monotonic()
        current = _current_replicas(memory, deployment, tick)
        scraped = False
        if (
            spec.autoscaling is not None
            and current is not None
            and tick - memory.scraped_at >= INTERVAL * 0.9
        ):
            await self._scrape(obj, memory, spec, pods, current, now)
            memory.scraped_at, scraped = tick, True
        wanted = adapters.wanted(
            meta["name"], spec, (indexes.get("trainjobs") or {}).get(meta["namespace"], ())
        )
        base = build.served_name(build.ServiceRef(meta["name"], meta["namespace"], meta["uid"]), spec)
        served, urls = await self._served(spec, base, pods)
        generation = meta.get("generation")
        if memory.applied_spec_replicas is None:  # new to this process: changed only if never applied
            replicas_changed = status.observed_generation is None
        else:
            replicas_changed = spec.replicas != memory.applied_spec_replicas
        return Observed(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=generation,
            spec=spec,
            status=status,
            deployment=deployment,
            pods=pods,
            now=now,
            cfg=self.cfg,
            applied=memory.applied_generation == generation,
            applied_replicas=memory.applied_replicas,
            replicas_changed=replicas_changed,
            current=current,
            reapply_due=tick - memory.applied_at >= REAPPLY_SECONDS,
            notes=tuple(location.notes),
            history=memory.history,
            scraped=scraped,
            autoscaling_refresh_due=tick - memory.autoscaling_written >= AUTOSCALING_STATUS_REFRESH,
            interval=INTERVAL,
            adapters=wanted,
            served=served,
            pod_urls=urls,
            load_errors=dict(memory.load_errors),
        )

    async def _served(
        self, spec: InferenceServiceSpec, base: str, pods: tuple[ServingPod, ...]
    ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """Each ready replica's adapters, from its /v1/models (the observed state of the adapters);
        a replica that does not answer is left out this pass (nothing is loaded on it blindly)."""
        if spec.engine.lora is None:
            return {}, {}
        urls = {p.name: f"http://{p.ip}:{build.SERVER_PORT}" for p in pods if p.serving and p.ip}
        served: dict[str, dict[str, str]] = {}
        for pod, url in urls.items():
            try:
                async with self.http().get(
                    f"{url}/v1/models", timeout=_timeout(MODELS_TIMEOUT_SECONDS)
                ) as response:
                    if response.status == 200:
                        served[pod] = adapter_sync.served_adapters(await response.json(), base)
            except Exception:  # noqa: BLE001 - not answering (yet): looked at again next pass
                continue
        return served, {pod: urls[pod] for pod in served}

    async def call(self, memory: ServiceMemory, action: AdapterCall) -> None:
        """One load/unload on one replica. Loaded already / gone already count as done; any other
        answer is the adapter's lastError (in status on the next pass), never a failed reconcile."""
        body: dict[str, Any] = {"lora_name": action.name}
        if action.verb == "load":
            body["lora_path"] = action.path
        try:
            async with self.http().post(
                f"{action.base_url}/v1/{action.verb}_lora_adapter",
                json=body,
                timeout=_timeout(LOAD_TIMEOUT_SECONDS),
            ) as response:
                text = await response.text()
                done = response.status == 200 or (
                    (action.verb == "unload" and response.status == 404)
                    or (action.verb == "load" and "already been loaded" in text)
                )
        except Exception as exc:  # noqa: BLE001 - the pod went away or timed out: retried next pass
            memory.load_errors[action.name] = (
                f"{action.pod}: {action.verb} failed: {exc or type(exc).__name__}"
            )
            return
        if done:
            memory.load_errors.pop(action.name, None)
        else:
            memory.load_errors[action.name] = f"{action.pod}: {_error_message(text)}"[: r.MAX_MESSAGE]

    async def _scrape(
        self,
        obj: Object,
        memory: ServiceMemory,
        spec: InferenceServiceSpec,
        pods: tuple[ServingPod, ...],
        current: int,
        now: datetime,
    ) -> None:
        """One look at the READY pods' engine gauges, appended to the (pruned) history."""
        policy = spec.autoscaling
        assert policy is not None
        if memory.size is not None and current != memory.size:
            # sized by someone else (kubectl scale, a wake from zero, a spec change): recommendations
            # made for the old size say nothing about the new one, so the windows start over
            memory.history = ()
        memory.size = current
        meta = obj["metadata"]
        template = (meta.get("annotations") or {}).get(build.ANNOTATION_METRICS_URL)
        ready = [p for p in pods if p.serving]
        urls = {
            p.name: metrics_scraper.metrics_url(
                template, pod=p.name, ip=p.ip, namespace=meta["namespace"], name=meta["name"]
            )
            for p in ready
        }
        samples = await metrics_scraper.scrape({pod: url for pod, url in urls.items() if url}, self.http())
        answered = {pod: sample for pod, sample in samples.items() if sample is not None}
        scrape = autoscaler.Scrape(
            time=now,
            replicas=current,
            pods=answered,
            not_ready=sum(1 for p in pods if p.active and not p.serving),
            missing=len(ready) - len(answered),
        )
        memory.history = autoscaler.prune((*memory.history, scrape), policy, now)

    def decide(self, observed: Observed) -> Decision[InferenceServiceStatus]:
        return decide(observed)

    def invalid(self, obj: Object, message: str, now: datetime) -> Decision[InferenceServiceStatus]:
        status = InferenceServiceStatus.model_validate(plain(obj.get("status")) or {})
        generation = obj["metadata"].get("generation")
        return invalid_spec(status, generation, message, now, also_false=(r.ConditionReady,))

    def refused(
        self, obj: Object, observed: Observed, refusal: reconcile.Refusal
    ) -> Decision[InferenceServiceStatus] | None:
        """422 (e.g. a passed-through volume the API server refuses): not worth retrying."""
        if refusal.error.status != 422:
            return None
        message = r.MessageOwnedObjectRefused.format(error=refusal.error.message)
        return self.invalid(obj, message, observed.now.replace(microsecond=0))

    def acted(
        self, memory: ServiceMemory, observed: Observed, decision: Decision[InferenceServiceStatus]
    ) -> None:
        tick = time.monotonic()
        for action in decision.actions:
            if isinstance(action, Scale):
                memory.expected = (action.replicas, tick + 3 * INTERVAL)
                memory.size = action.replicas
            elif isinstance(action, Apply) and action.obj.get("kind") == "Deployment":
                replicas = action.obj["spec"]["replicas"]
                memory.applied_at, memory.applied_replicas = tick, replicas
                memory.applied_spec_replicas = observed.spec.replicas
                if observed.current != replicas:
                    memory.expected = (replicas, tick + 3 * INTERVAL)
        if decision.status.autoscaling != observed.status.autoscaling:
            memory.autoscaling_written = tick


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


def _error_message(text: str) -> str:
    """The engine's OpenAI-style error body -> its message (the 400 names the file)."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text


def _current_replicas(memory: ServiceMemory, deployment: DeploymentView | None, tick: float) -> int | None:
    """The Deployment's size, or what we just set it to while the watch has not shown it yet."""
    if deployment is None:
        return None
    if memory.expected is not None:
        replicas, deadline = memory.expected
        if deployment.replicas == replicas or tick > deadline:
            memory.expected = None
        else:
            return replicas
    return deployment.replicas


# --- handlers -------------------------------------------------------------------------------------


@kopf.on.startup(id="inferenceservice-runtime")
async def _startup(memo: kopf.Memo, **_: Any) -> None:
    kind = InferenceServices(cfg=build_config_from_env())
    await kind.connect()
    memo.inferenceservice = kind


@kopf.on.cleanup(id="inferenceservice-cleanup")
async def _shutdown(memo: kopf.Memo, **_: Any) -> None:
    kind: InferenceServices | None = getattr(memo, "inferenceservice", None)
    if kind is None:
        return
    if kind.session is not None:
        await kind.session.close()
    await kind.close()


# The indexes double as wake-up signals: kopf calls indexers on every watch event, in the event
# loop (they are async: asyncio.Event is not thread-safe).


@kopf.index("pods", labels=OWNED)
async def inferenceservice_pods(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> dict:
    """(namespace, InferenceService name) -> its server pods, kept current by the pod watch."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.inferenceservice.wake(namespace, labels[build.LABEL_INFERENCESERVICE])
    return {(namespace, labels[build.LABEL_INFERENCESERVICE]): ServingPod.from_pod(body)}


@kopf.index("apps", "v1", "deployments", labels=OWNED)
async def inferenceservice_deployments(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> dict:
    namespace = namespace or ""  # namespaced kinds: always set
    memo.inferenceservice.wake(namespace, labels[build.LABEL_INFERENCESERVICE])
    return {(namespace, labels[build.LABEL_INFERENCESERVICE]): DeploymentView.from_deployment(body)}


@kopf.index(c.GROUP, c.VERSION, "trainjobs")
async def inferenceservice_trainjobs(*, namespace: str | None, body: kopf.Body, memo: Any, **_: Any) -> dict:
    """namespace -> its TrainJobs (fromTrainJob and serveAfter adapters). A TrainJob's change wakes every
    InferenceService of its namespace: which ones refer to it is theirs to know."""
    namespace = namespace or ""  # namespaced kinds: always set
    kind: InferenceServices = memo.inferenceservice
    for ns, name in list(kind.memories):
        if ns == namespace:
            kind.wake(ns, name)
    return {namespace: adapters.TrainJobView.from_trainjob(body)}


@kopf.index(c.GROUP, c.VERSION, PLURAL)
async def inferenceservice_generations(
    *, namespace: str | None, name: str, meta: Mapping[str, Any], memo: Any, **_: Any
) -> dict:
    """(namespace, name) -> metadata.generation; a new one (a spec edit) wakes the daemon."""
    namespace = namespace or ""  # namespaced kinds: always set
    memo.inferenceservice.saw_generation(namespace, name, meta.get("generation"))
    return {(namespace, name): meta.get("generation")}


@kopf.daemon(c.GROUP, c.VERSION, PLURAL, id="inferenceservice", cancellation_timeout=10.0)
async def inferenceservice_daemon(
    *, body: kopf.Body, stopped: kopf.DaemonStopped, memo: Any, logger: kopf.Logger, **kwargs: Any
) -> None:
    """One per InferenceService; kopf passes the indexes by name."""
    indexes = {
        "pods": kwargs["inferenceservice_pods"],
        "deployments": kwargs["inferenceservice_deployments"],
        "trainjobs": kwargs["inferenceservice_trainjobs"],
    }
    await reconcile.run(memo.inferenceservice, body, stopped, indexes, logger)
