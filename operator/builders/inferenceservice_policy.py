"""The InferenceService decision as one pure function: what the cluster and this process's scrapes
show -> the status, its Events and what to do (apply the owned objects, scale the Deployment).

One pass, in this order of precedence:

1. invalid spec: terminal Failed (decision.invalid_spec; the controller's `invalid`);
2. a generation new to this process: server-side apply the Deployment (at `replicas_to_apply`),
   the Service and the PodDisruptionBudget (or delete it); status.observedGeneration moves on the
   next pass, with the Applied Event, once the apply went through;
3. otherwise the status is `reflect`ed from the Deployment and its pods, and
   - every REAPPLY_SECONDS the owned objects are applied again at the Deployment's current size
     (a no-op unless someone edited or deleted one: it is put back);
   - without autoscaling, a Deployment someone scaled goes back to spec.replicas (ReplicasRestored);
   - with autoscaling, on a pass that scraped, operator/autoscaler.py decides and the Deployment is
     scaled; status.autoscaling is rewritten when it changed, or every AUTOSCALING_STATUS_REFRESH.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lmforge.operator import adapter_sync, autoscaler
from lmforge.operator.api import reasons as r
from lmforge.operator.api.inferenceservice import AdapterStatus, InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.builders import inferenceservice as build
from lmforge.operator.builders.inferenceservice_adapters import Wanted, summary
from lmforge.operator.builders.inferenceservice_status import (
    DeploymentView,
    ServingPod,
    record_autoscaling,
    reflect,
)
from lmforge.operator.decision import Action, AdapterCall, Apply, Decision, Delete, Event, Scale, is_terminal

INTERVAL_SECONDS = 5.0  # look (and scrape) this often (LMFORGE_AUTOSCALER_INTERVAL_SECONDS)
AUTOSCALER_MANAGER = "lmforge-autoscaler"


@dataclass(frozen=True, slots=True)
class Observed:
    """The InferenceService as the controller sees it at `now`."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    spec: InferenceServiceSpec
    status: InferenceServiceStatus
    deployment: DeploymentView | None
    pods: tuple[ServingPod, ...]
    now: datetime  # precise (clock.precise_now): the autoscaler's windows
    cfg: build.BuildConfig = field(default_factory=build.BuildConfig)
    applied: bool = True  # the owned objects hold this generation (applied by this process)
    applied_replicas: int | None = None  # the size the last apply set
    replicas_changed: bool = False  # spec.replicas changed since this process last applied it
    current: int | None = None  # the Deployment's size, or what we just set while the watch lags
    reapply_due: bool = False  # REAPPLY_SECONDS since the last apply
    notes: tuple[str, ...] = ()  # about the model's location (hf:// ...), posted with Applied
    history: tuple[autoscaler.Scrape, ...] = ()  # with this pass's scrape last, when `scraped`
    scraped: bool = False  # this pass scraped the pods: the autoscaler decides
    autoscaling_refresh_due: bool = False  # rewrite status.autoscaling even without a change
    interval: float = INTERVAL_SECONDS
    adapters: Wanted = field(default_factory=lambda: Wanted({}, {}, ()))  # what to serve (spec, serveAfter)
    served: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # ready pod -> adapter -> dir
    pod_urls: Mapping[str, str] = field(default_factory=dict)  # ready pod -> http://<ip>:8000
    load_errors: Mapping[str, str] = field(default_factory=dict)  # adapter -> its last failed call

    @property
    def ref(self) -> build.ServiceRef:
        return build.ServiceRef(name=self.name, namespace=self.namespace, uid=self.uid)


def apply_owned(obs: Observed, replicas: int) -> tuple[Action, ...]:
    """The Deployment at `replicas`, the Service, and the PDB (or its deletion when at most one
    replica can exist)."""
    pdb = build.pod_disruption_budget(obs.ref, obs.spec)
    return (
        Apply(build.deployment(obs.ref, obs.spec, replicas, obs.cfg)),
        Apply(build.service(obs.ref)),
        Apply(pdb) if pdb else Delete("policy/v1", "PodDisruptionBudget", obs.namespace, obs.name),
    )


def decide(obs: Observed) -> Decision[InferenceServiceStatus]:
    if is_terminal(obs.status):
        return Decision(obs.status, requeue_after=None)  # an invalid spec: Failed never changes
    if not obs.applied:
        replicas = build.replicas_to_apply(obs.spec, obs.current, obs.replicas_changed)
        return Decision(
            obs.status,
            actions=apply_owned(obs, replicas),
            requeue_after=obs.interval,
            applies_generation=obs.generation,
        )
    status = obs.status.model_copy(
        update={
            "observed_generation": obs.generation,
            "url": build.url(obs.name, obs.namespace, obs.cfg),
            "selector": build.selector(obs.name),
        }
    )
    stamp = obs.now.replace(microsecond=0)  # status times are whole seconds; the autoscaler is precise
    reflection = reflect(obs.name, obs.spec, status, obs.deployment, obs.pods, stamp)
    status, events = reflection.status, [*_applied_events(obs), *reflection.events]
    actions: list[Action] = []
    if obs.reapply_due:
        size = obs.deployment.replicas if obs.deployment else build.replicas_to_apply(obs.spec, None, False)
        actions += apply_owned(obs, size)
    if obs.deployment is not None and obs.current is not None:
        status, scaling, scale_events = _scale(obs, status, obs.current)
        actions += scaling
        events += scale_events
    status, adapter_calls = serve_adapters(obs, status)
    actions += adapter_calls
    return Decision(status, events=tuple(events), actions=tuple(actions), requeue_after=obs.interval)


def _applied_events(obs: Observed) -> list[Event]:
    """Applied (and the model location's notes) once per generation: when observedGeneration moves.
    An operator restarted on the same generation re-applies quietly."""
    if obs.status.observed_generation == obs.generation:
        return []
    pdb = build.pod_disruption_budget(obs.ref, obs.spec)
    parts = "Deployment, Service" + (" and PodDisruptionBudget" if pdb else "")
    replicas = obs.applied_replicas if obs.applied_replicas is not None else obs.current
    message = r.MessageApplied.format(parts=parts, generation=obs.generation, replicas=replicas)
    return [
        Event("Normal", r.ReasonApplied, message),
        *(Event("Normal", r.ReasonModelFromHub, note) for note in obs.notes),
    ]


def _scale(
    obs: Observed, status: InferenceServiceStatus, current: int
) -> tuple[InferenceServiceStatus, list[Action], list[Event]]:
    """Without autoscaling: spec.replicas, put back. With it: the autoscaler's decision."""
    if obs.spec.autoscaling is None:
        if current == obs.spec.replicas:
            return status, [], []
        message = r.MessageReplicasRestored.format(current=current, replicas=obs.spec.replicas)
        return (
            status,
            [Scale("apps/v1", "Deployment", obs.namespace, obs.name, obs.spec.replicas)],
            [Event("Normal", r.ReasonReplicasRestored, message)],
        )
    if not obs.scraped:
        return status, [], []
    policy = obs.spec.autoscaling
    decision = autoscaler.decide(obs.history, current, policy, obs.now, obs.spec.engine.max_num_seqs)
    actions: list[Action] = []
    if decision.changed:
        actions.append(
            Scale("apps/v1", "Deployment", obs.namespace, obs.name, decision.replicas, AUTOSCALER_MANAGER)
        )
    previous = status.autoscaling
    fresh = (
        decision.changed
        or previous is None
        or previous.desired_replicas != decision.recommendation
        or obs.autoscaling_refresh_due
    )
    if not fresh:
        return status, actions, []
    status, event = record_autoscaling(
        status,
        desired=decision.recommendation,
        metric_value=decision.metric_value,
        reason=decision.reason,
        scaled_from=current if decision.changed else None,
        scaled_to=decision.replicas if decision.changed else None,
        now=obs.now.replace(microsecond=0),
    )
    return status, actions, [event] if event else []


def serve_adapters(
    obs: Observed, status: InferenceServiceStatus
) -> tuple[InferenceServiceStatus, list[AdapterCall]]:
    """Per ready replica that answered /v1/models: unload what is no longer wanted, load what is
    missing (adapter_sync.plan); status.adapters lists every wanted adapter with the replicas serving
    it now and its last error (a TrainJob not done yet, a load the engine refused)."""
    wanted = obs.adapters
    calls = [
        AdapterCall(a.replica, obs.pod_urls[a.replica], a.verb, a.name, a.path)
        for a in adapter_sync.plan(wanted.paths, obs.served)
        if a.replica in obs.pod_urls
    ]
    errors = {**{k: v for k, v in obs.load_errors.items() if k in wanted.paths}, **wanted.errors}
    by_name: dict[str, dict[str, Any]] = {
        e["name"]: e for e in adapter_sync.status_entries(wanted.paths, obs.served, errors)
    }
    entries = [
        AdapterStatus.model_validate(by_name.get(name) or {"name": name, "lastError": errors.get(name)})
        for name in wanted.names
    ]
    summary_text = summary([e.model_dump() for e in entries], len(obs.served))
    update = {"adapters": entries, "adapters_summary": summary_text}
    return status.model_copy(update=update), calls
