"""The autoscaler decision on recorded traces: bursts, noise, drops, bounds, loading pods."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from lmforge.operator.api.inferenceservice import Autoscaling
from lmforge.operator.autoscaler import PodSample, Scrape, decide, prune, recommend

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
TICK = 5.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def policy(**overrides) -> Autoscaling:
    base = {
        "minReplicas": 1,
        "maxReplicas": 10,
        "metric": "queue",
        "target": 4,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
        "maxScaleUpStep": 4,
        "maxScaleDownStep": 1,
    }
    return Autoscaling.model_validate({**base, **overrides})


def pods(*waiting: float, running: float = 0.0, kv: float = 0.0) -> dict[str, PodSample]:
    return {f"p{i}": PodSample(waiting=w, running=running, kv_cache=kv) for i, w in enumerate(waiting)}


# --- rule 1: one scrape -> one recommendation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("scrape", "spec", "want", "metric_value"),
    [
        pytest.param(Scrape(T0, 2, pods(4.3, 4.1)), policy(), 2, 4.2, id="within-tolerance-holds"),
        pytest.param(Scrape(T0, 2, pods(9, 10)), policy(), 5, 9.5, id="above-target-proportional"),
        pytest.param(
            Scrape(T0, 4, pods(1, 1, 1, 1, running=10)), policy(), 1, 1.0, id="below-target-proportional"
        ),
        pytest.param(
            Scrape(T0, 3, pods(9), not_ready=2), policy(), 3, 9.0, id="loading-pods-count-as-capacity"
        ),
        pytest.param(
            Scrape(T0, 3, pods(18), not_ready=2), policy(), 5, 18.0, id="loading-pods-capacity-not-enough"
        ),
        pytest.param(
            Scrape(T0, 4, pods(3, 3, 3), missing=1),
            policy(),
            4,
            3.0,
            id="silent-pod-counts-at-target-when-scaling-down",
        ),
        pytest.param(Scrape(T0, 2, {}, not_ready=2), policy(), 2, None, id="no-metrics-holds"),
        pytest.param(
            Scrape(T0, 2, pods(0, 0)), policy(minReplicas=0), 0, 0.0, id="idle-scales-to-zero-when-allowed"
        ),
        pytest.param(
            Scrape(T0, 2, pods(0, 0, running=3)),
            policy(minReplicas=0),
            1,
            0.0,
            id="running-requests-never-scale-to-zero",
        ),
        pytest.param(
            Scrape(T0, 4, pods(0, 0, 0, 0, running=200)),
            policy(),
            4,
            0.0,
            id="empty-queue-full-batches-keep-capacity",
        ),
        pytest.param(Scrape(T0, 0, {}), policy(minReplicas=0), 0, None, id="zero-without-activator-holds"),
        pytest.param(
            Scrape(T0, 0, {}, activator_waiting=9),
            policy(minReplicas=0),
            3,
            9.0,
            id="zero-with-activator-demand",
        ),
        pytest.param(
            Scrape(T0, 2, pods(0, 0, kv=0.9)),
            policy(metric="kvCache", target=0.6),
            3,
            0.9,
            id="kv-cache-metric",
        ),
        pytest.param(
            Scrape(T0, 2, pods(0, 0, running=30)),
            policy(metric="running", target=10),
            6,
            30.0,
            id="running-metric",
        ),
    ],
)
def test_recommend(scrape: Scrape, spec: Autoscaling, want: int, metric_value: float | None) -> None:
    got = recommend(scrape, spec, max_num_seqs=64)
    assert (got.replicas, got.metric_value) == (want, pytest.approx(metric_value)), got.reason


def test_recommendation_reasons_say_what_was_seen() -> None:
    assert recommend(Scrape(T0, 2, pods(9, 10)), policy()).reason == "queue 9.5/replica > target 4: wants 5"
    assert recommend(Scrape(T0, 3, pods(9), not_ready=2), policy()).reason == (
        "queue 9/replica > target 4, but 2 replica(s) not ready yet count as capacity: wants 3"
    )


# --- simulation: the decision driving a service whose load we control ------------------------------------


@dataclass
class Run:
    start: int
    replicas: list[tuple[float, int]]  # (time, replicas after the decision)
    reasons: list[str]

    @property
    def changes(self) -> list[tuple[float, int]]:
        out, last = [], self.start
        for t, n in self.replicas:
            if n != last:
                out.append((t, n))
            last = n
        return out


def simulate(
    load: Callable[[float, int], float],
    spec: Autoscaling,
    start: int,
    seconds: float,
    loading_seconds: float = 0.0,
    warmup: float = 600.0,
) -> Run:
    """Every TICK: each ready pod reports `load(t, ready) ` waiting requests (the total queue
    spread over ready pods); new pods are not ready for `loading_seconds`. The history starts
    `warmup` seconds before t=0 at the starting load, as for an operator that has been watching."""
    current, history, born = start, [], {f"p{i}": -1e9 for i in range(start)}
    run = Run(start, [], [])
    t = -warmup
    while t <= seconds:
        names = sorted(born, key=lambda n: int(n[1:]))[:current]
        ready = [n for n in names if t - born[n] >= loading_seconds]
        per_pod = load(t, len(ready)) if ready else 0.0
        history.append(
            Scrape(
                at(t),
                current,
                {n: PodSample(waiting=per_pod) for n in ready},
                not_ready=len(names) - len(ready),
            )
        )
        history = list(prune(history, spec, at(t)))
        decision = decide(history, current, spec, at(t))
        if decision.replicas > current:
            for i in range(len(born), len(born) + decision.replicas - current):
                born[f"p{i}"] = t
        elif decision.replicas < current:
            for name in sorted(born, key=lambda n: int(n[1:]))[decision.replicas :]:
                del born[name]
        current = decision.replicas
        if t >= 0:
            run.replicas.append((t, current))
            run.reasons.append(decision.reason)
        t += TICK
    return run


def total_queue(series: Callable[[float], float]) -> Callable[[float, int], float]:
    return lambda t, ready: series(t) / ready


def test_burst_scales_up_within_one_up_window() -> None:
    spec = policy(scaleUpStabilizationSeconds=15)
    run = simulate(total_queue(lambda t: 8 if t < 60 else 40), spec, start=2, seconds=120)
    first = run.changes[0]
    assert 60 < first[0] <= 60 + 15, run.changes
    assert first[1] == 6  # 2 + maxScaleUpStep 4 (ceil(40/4) = 10 wanted)
    assert run.replicas[-1][1] == 10


def test_burst_with_zero_up_window_scales_on_the_next_look() -> None:
    run = simulate(total_queue(lambda t: 8 if t < 60 else 20), policy(), start=2, seconds=90)
    assert run.changes[0] == (60, 5)


@pytest.mark.parametrize(
    ("noise", "up_window"),
    [
        pytest.param(0.09, 0, id="noise-inside-tolerance"),
        pytest.param(0.30, 30, id="noise-beyond-tolerance-up-window-30s"),
    ],
)
def test_noise_around_the_target_never_flaps(noise: float, up_window: int) -> None:
    rng = random.Random(7)
    samples = [1 + rng.uniform(-noise, noise) for _ in range(2000)]
    queue = total_queue(lambda t: 3 * 4 * samples[int(t // TICK) % len(samples)])  # 3 replicas at target
    run = simulate(queue, policy(scaleUpStabilizationSeconds=up_window), start=3, seconds=2 * 3600)
    assert run.changes == []


def test_same_noise_without_stabilization_flaps() -> None:
    """The control: the windows, not luck, keep the noisy trace above flat."""
    rng = random.Random(7)
    samples = [1 + rng.uniform(-0.3, 0.3) for _ in range(2000)]
    queue = total_queue(lambda t: 3 * 4 * samples[int(t // TICK) % len(samples)])
    run = simulate(queue, policy(scaleDownStabilizationSeconds=0), start=3, seconds=3600)
    assert len(run.changes) > 50


def test_drop_scales_down_only_after_the_down_window() -> None:
    run = simulate(total_queue(lambda t: 16 if t < 100 else 0.5), policy(), start=4, seconds=600)
    first = run.changes[0]
    assert first == (400, 3)  # the first look whose 300 s window holds only post-drop recommendations
    assert [n for _, n in run.changes] == [3, 2, 1]  # maxScaleDownStep 1 per decision, down to minReplicas
    assert "highest recommendation in the last 300s" in run.reasons[run.replicas.index((395, 4))]


def test_bounds_and_steps() -> None:
    run = simulate(
        total_queue(lambda t: 400), policy(maxReplicas=7, maxScaleUpStep=2), start=1, seconds=60, warmup=0
    )
    assert [n for _, n in run.changes] == [3, 5, 7]
    spec = policy(minReplicas=2, maxScaleDownStep=3, scaleDownStabilizationSeconds=0)
    run = simulate(total_queue(lambda t: 0), spec, start=9, seconds=30, warmup=0)
    assert [n for _, n in run.changes] == [6, 3, 2]


def test_loading_pods_do_not_cause_a_scale_up_storm() -> None:
    """Load needs 8 replicas; new pods take 120 s to load. Without counting them as capacity the
    autoscaler would keep adding maxScaleUpStep every look while they load."""
    run = simulate(
        total_queue(lambda t: 32), policy(maxReplicas=20), start=2, seconds=400, loading_seconds=120, warmup=0
    )
    assert [n for _, n in run.changes] == [6, 8]
    assert run.replicas[-1][1] == 8


def test_fresh_history_never_scales_down_before_covering_the_window() -> None:
    """An operator that just (re)started knows nothing of the last 300 s."""
    spec = policy()
    history = [Scrape(at(t), 4, pods(0, 0, 0, 0)) for t in range(0, 300, 5)]
    assert decide(history, 4, spec, at(295)).replicas == 4
    assert (
        "observed for less than scaleDownStabilizationSeconds=300" in decide(history, 4, spec, at(295)).reason
    )
    history.append(Scrape(at(300), 4, pods(0, 0, 0, 0)))
    assert decide(history, 4, spec, at(300)).replicas == 3


def test_stale_metrics_hold_but_bounds_still_apply() -> None:
    history = [Scrape(at(0), 12, pods(*[40] * 12))]
    got = decide(history, 12, policy(), at(60))
    assert (got.replicas, got.reason) == (10, "no fresh metrics: hold; bounds [1, 10]: 12 -> 10")
    assert decide([], 3, policy(), at(0)).replicas == 3


def test_decision_reason_reads_as_a_sentence() -> None:
    got = decide([Scrape(at(0), 2, pods(19, 19))], 2, policy(), at(0))
    assert got.reason == "queue 19/replica > target 4: wants 10; limited by maxScaleUpStep 4; 2 -> 6"
    assert (got.replicas, got.recommendation, got.metric_value, got.direction) == (6, 10, 19.0, "up")


def test_prune_keeps_the_window_and_one_witness() -> None:
    history = [Scrape(at(t), 2, pods(4, 4)) for t in range(0, 1000, 5)]
    kept = prune(history, policy(), at(995))
    assert kept[0].time == at(695) and kept[-1].time == at(995) and len(kept) == 61
