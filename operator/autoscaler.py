"""The autoscaler's decision: a pure function of scrape history -> replica count + reason.

No clock, no I/O, no memory of its own: the controller's timer scrapes the ready pods every few
seconds, appends a `Scrape` to an in-memory history, `prune`s it and calls `decide`. The history
is lost when the operator restarts (or another replica takes over): that only delays decisions,
because a direction is allowed only once the history covers its whole stabilization window (so a
fresh operator never scales down on its first look). The last scale time survives in
status.autoscaling.lastScaleTime.

Semantics (those of the Kubernetes HPA v2 `behavior`, on engine metrics):

1. Recommendation, per scrape (`recommend`). `avg` = the metric averaged over READY pods that
   answered /metrics; pods not ready (loading the model, draining) are left out of the average.
   - within the tolerance band (|avg/target - 1| <= 10%): keep the replicas;
   - above: ceil(current * avg / target), counting not-ready and silent pods as 0 load, i.e.
     ceil(total load / target): replicas that are still loading count as capacity, so a
     minutes-long model load does not trigger a scale-up storm;
   - below: ceil(current * avg / target), counting ready pods that did not answer as AT target
     (never scale down blind); never below what the running requests need (metric `queue`:
     ceil(running / maxNumSeqs), since an empty queue says nothing about a full batch); never to 0
     unless every pod is idle (no running and no waiting requests) and minReplicas is 0.
2. Stabilization (`decide`): scale up only to the LOWEST recommendation in effect during the last
   scaleUpStabilizationSeconds (every look in the window must agree that more are needed);
   scale down only to the HIGHEST recommendation in effect during the last
   scaleDownStabilizationSeconds. "In effect" includes the look made just before the window
   opened, so a change first seen at t moves the replicas at t + window at the earliest, never a
   scrape interval sooner (HPA's own windows are short by up to one sync period). Noise that
   crosses the target back and forth therefore never moves the replicas.
3. Step limits: at most maxScaleUpStep added / maxScaleDownStep removed per decision.
4. Bounds: [minReplicas, maxReplicas], always (also when no metrics arrive).

Scale to zero and the activator seam: at 0 replicas there is no pod to scrape, so nothing here can
see demand. `Scrape.activator_waiting` is where an activator (a component that holds requests while
no replica is ready, as Knative's does) will report the requests it holds; with it, rule 1 gives
ceil(waiting / target) >= 1 from zero. Until one exists the controller leaves it None and the
service stays at zero until someone scales its Deployment (status condition ScaleToZero says so).
A size set by someone else restarts the windows (the controller clears the history), so a woken
service is not sent back to zero by recommendations made while it was at zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from lmforge.operator.api.inferenceservice import Autoscaling

TOLERANCE = 0.1
STALE_AFTER = timedelta(seconds=30)  # no scrape this recent: hold (only the bounds apply)
MAX_SCRAPES = 2000  # hard cap on history length, whatever the windows
_EPS = 1e-9

Metric = Literal["queue", "running", "kvCache"]
Direction = Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod's engine gauges at one scrape (vLLM names in metrics_scraper.METRICS)."""

    waiting: float = 0.0  # vllm:num_requests_waiting
    running: float = 0.0  # vllm:num_requests_running
    kv_cache: float = 0.0  # vllm:kv_cache_usage_perc, in [0, 1]

    def value(self, metric: Metric) -> float:
        return {"queue": self.waiting, "running": self.running, "kvCache": self.kv_cache}[metric]

    @property
    def idle(self) -> bool:
        return self.waiting <= 0 and self.running <= 0


@dataclass(frozen=True, slots=True)
class Scrape:
    """One look at the service: the Deployment's replicas and every READY pod's gauges."""

    time: datetime
    replicas: int  # Deployment spec.replicas at that moment
    pods: Mapping[str, PodSample] = field(default_factory=dict)  # ready pods that answered
    not_ready: int = 0  # pods that exist but are not ready (loading, draining): left out
    missing: int = 0  # ready pods whose /metrics did not answer
    activator_waiting: float | None = None  # the activator seam (see the module docstring)


@dataclass(frozen=True, slots=True)
class Recommendation:
    replicas: int
    metric_value: float | None  # avg per ready replica (or the activator's queue at zero)
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int  # what the Deployment should have now
    current: int
    recommendation: int  # this look's recommendation, bounded (before stabilization and steps)
    metric_value: float | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.replicas != self.current

    @property
    def direction(self) -> Direction | None:
        return None if not self.changed else "up" if self.replicas > self.current else "down"


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def recommend(scrape: Scrape, spec: Autoscaling, max_num_seqs: int | None = None) -> Recommendation:
    """Rule 1 of the module docstring for one scrape (no stabilization, steps or bounds)."""
    metric, target, current = spec.metric, spec.target, scrape.replicas
    if current == 0:
        return _recommend_from_zero(scrape, spec)
    values = [pod.value(metric) for pod in scrape.pods.values()]
    if not values:
        return Recommendation(
            current,
            None,
            f"no metrics from ready replicas ({scrape.not_ready} not ready, "
            f"{scrape.missing} not answering): wants {current}",
        )
    total = sum(values)
    avg = total / len(values)
    ratio = avg / target
    head = f"{metric} {_fmt(avg)}/replica"
    if abs(ratio - 1) <= TOLERANCE:
        return Recommendation(
            current, avg, f"{head} within {TOLERANCE:.0%} of target {target:g}: wants {current}"
        )
    if ratio > 1:
        return _recommend_up(scrape, spec, total, len(values), head)
    return _recommend_down(scrape, spec, total, len(values), head, max_num_seqs)


def _recommend_from_zero(scrape: Scrape, spec: Autoscaling) -> Recommendation:
    """At zero replicas only the activator's queue says whether anyone waits (the cold start)."""
    demand = scrape.activator_waiting
    if demand is None:
        return Recommendation(0, None, "at zero replicas: no activator reports demand, hold")
    if demand <= 0:
        return Recommendation(0, 0.0, "at zero replicas: no request waiting at the activator")
    want = max(1, _ceil(demand / spec.target)) if spec.metric == "queue" else 1
    return Recommendation(
        want, demand, f"{_fmt(demand)} request(s) waiting at the activator (cold start): wants {want}"
    )


def _recommend_up(
    scrape: Scrape, spec: Autoscaling, total: float, reporting: int, head: str
) -> Recommendation:
    """Above target: enough replicas for `total` at target, where replicas not ready yet count as
    capacity (they will take load once up, so the same demand does not scale up twice)."""
    current, target, avg = scrape.replicas, spec.target, total / reporting
    want = _ceil(total / target)
    unknown = max(current, reporting + scrape.not_ready + scrape.missing) - reporting
    if want <= current:
        return Recommendation(
            current,
            avg,
            f"{head} > target {target:g}, but {unknown} replica(s) not ready yet count as capacity: wants {current}",
        )
    return Recommendation(want, avg, f"{head} > target {target:g}: wants {want}")


def _recommend_down(
    scrape: Scrape, spec: Autoscaling, total: float, reporting: int, head: str, max_num_seqs: int | None
) -> Recommendation:
    """Below target: replicas not answering count as at target (never scale down on missing data),
    the floor is 1 unless every replica is idle and minReplicas is 0, and (queue metric) never fewer
    replicas than the running requests need at max_num_seqs each."""
    current, target, avg = scrape.replicas, spec.target, total / reporting
    adjusted = (total + scrape.missing * target) / (reporting + scrape.missing)
    if adjusted / target >= 1 - TOLERANCE:
        return Recommendation(
            current,
            avg,
            f"{head} < target {target:g}, but {scrape.missing} replica(s) not "
            f"answering count as at target: wants {current}",
        )
    want = _ceil(current * adjusted / target)
    idle = scrape.missing == 0 and scrape.not_ready == 0 and all(p.idle for p in scrape.pods.values())
    floor, why = (0, "") if idle and spec.min_replicas == 0 else (1, "")
    if spec.metric == "queue" and max_num_seqs:
        running = sum(p.running for p in scrape.pods.values())
        if _ceil(running / max_num_seqs) > max(want, floor):
            floor, why = _ceil(running / max_num_seqs), f" ({_fmt(running)} running requests need them)"
    want = max(want, floor)
    if want >= current:
        return Recommendation(current, avg, f"{head} < target {target:g}: wants {current}{why}")
    return Recommendation(want, avg, f"{head} < target {target:g}: wants {want}{why}")


def decide(
    history: Sequence[Scrape], current: int, spec: Autoscaling, now: datetime, max_num_seqs: int | None = None
) -> Decision:
    """The replicas the Deployment should have at `now` (rules 1-4 of the module docstring).
    `history` is oldest first; its last scrape is this look."""
    low, high = spec.min_replicas, spec.max_replicas
    if not history or now - history[-1].time > STALE_AFTER:
        replicas = max(low, min(high, current))
        note = "" if replicas == current else f"; bounds [{low}, {high}]: {current} -> {replicas}"
        return Decision(replicas, current, replicas, None, f"no fresh metrics: hold{note}")
    latest = recommend(history[-1], spec, max_num_seqs)
    recommendations = [(s.time, recommend(s, spec, max_num_seqs).replicas) for s in history[:-1]]
    recommendations.append((history[-1].time, latest.replicas))
    stabilized, reason = _stabilize(recommendations, latest, current, spec, now)
    replicas, reason = _limit_step(stabilized, current, spec, reason)
    bounded = max(low, min(high, replicas))
    if bounded != replicas:
        reason += f"; bounded by [{low}, {high}]"
    if bounded != current:
        reason += f"; {current} -> {bounded}"
    return Decision(bounded, current, max(low, min(high, latest.replicas)), latest.metric_value, reason)


def _stabilize(
    recommendations: list[tuple[datetime, int]],
    latest: Recommendation,
    current: int,
    spec: Autoscaling,
    now: datetime,
) -> tuple[int, str]:
    """Rule 2: scale up only to the lowest, down only to the highest recommendation in effect during
    the stabilization window, and not at all before the history covers that window."""
    up_window = _in_effect(recommendations, now - timedelta(seconds=spec.scale_up_stabilization_seconds))
    down_window = _in_effect(recommendations, now - timedelta(seconds=spec.scale_down_stabilization_seconds))
    up_recommendation = min(up_window) if up_window else latest.replicas
    down_recommendation = max(down_window) if down_window else latest.replicas
    stabilized = min(max(current, up_recommendation), down_recommendation)
    reason = latest.reason
    if latest.replicas > current and stabilized < latest.replicas:
        reason += (
            f"; scale-up held at {stabilized}: lowest recommendation in the last "
            f"{spec.scale_up_stabilization_seconds}s"
        )
    elif latest.replicas < current and stabilized > latest.replicas:
        reason += (
            f"; scale-down held at {stabilized}: highest recommendation in the last "
            f"{spec.scale_down_stabilization_seconds}s"
        )
    if stabilized > current and not up_window:
        return current, reason + (
            f"; scale-up waits: observed for less than "
            f"scaleUpStabilizationSeconds={spec.scale_up_stabilization_seconds}"
        )
    if stabilized < current and not down_window:
        return current, reason + (
            f"; scale-down waits: observed for less than "
            f"scaleDownStabilizationSeconds={spec.scale_down_stabilization_seconds}"
        )
    return stabilized, reason


def _limit_step(replicas: int, current: int, spec: Autoscaling, reason: str) -> tuple[int, str]:
    """Rule 3: at most maxScaleUpStep / maxScaleDownStep replicas per decision."""
    if replicas > current + spec.max_scale_up_step:
        return (
            current + spec.max_scale_up_step,
            reason + f"; limited by maxScaleUpStep {spec.max_scale_up_step}",
        )
    if replicas < current - spec.max_scale_down_step:
        return (
            current - spec.max_scale_down_step,
            reason + f"; limited by maxScaleDownStep {spec.max_scale_down_step}",
        )
    return replicas, reason


def _in_effect(recommendations: list[tuple[datetime, int]], since: datetime) -> list[int]:
    """The recommendations in effect at some moment of [since, now]: those made after `since`, and
    the newest one made at or before it (still in effect when the window opened). Empty when the
    history does not reach back to `since` (the window is not covered yet)."""
    opening = None
    inside = []
    for time, replicas in recommendations:
        if time > since:
            inside.append(replicas)
        else:
            opening = replicas
    return [] if opening is None else [opening, *inside]


def prune(history: Sequence[Scrape], spec: Autoscaling, now: datetime) -> tuple[Scrape, ...]:
    """Keep what `decide` can still use: every scrape inside the longest window, plus the newest
    one before it (it proves the window is covered)."""
    horizon = now - max(
        timedelta(seconds=max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)),
        STALE_AFTER,
    )
    inside = [i for i, scrape in enumerate(history) if scrape.time > horizon]
    start = (inside[0] - 1 if inside[0] > 0 else 0) if inside else max(len(history) - 1, 0)
    return tuple(history[start:][-MAX_SCRAPES:])
