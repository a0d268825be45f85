"""Prometheus metrics with vLLM's names (the operator's autoscaler and dashboards read them).

Two kinds of source:
- histograms and request counters are observed as requests progress (`ServerMetrics.observe_*`,
  called from the engine thread; prometheus_client is thread-safe);
- gauges and engine-wide totals are read at scrape time from the latest `EngineStats` snapshot
  the engine thread publishes (`EngineStatsCollector`), so a scrape never touches the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket edges (seconds).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What the engine thread publishes after each step (or batch of commands)."""

    num_running: int = 0
    num_waiting: int = 0  # in the engine's waiting queue
    kv_cache_usage: float = 0.0  # fraction in [0, 1]
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    max_lora: int = 0  # LoRA device slots (0: LoRA off)
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    lora_requests: tuple[tuple[str, int], ...] = ()  # per adapter name
    lora_prompt_tokens: tuple[tuple[str, int], ...] = ()
    lora_generation_tokens: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_engine(cls, raw: Any) -> EngineStats:
        """From LLMEngine.get_stats() (a dataclass; a dict with the same names works too)."""
        get = raw.get if isinstance(raw, dict) else (lambda name, default: getattr(raw, name, default))
        return cls(
            num_running=int(get("num_running", 0)),
            num_waiting=int(get("num_waiting", 0)),
            kv_cache_usage=float(get("kv_cache_usage", 0.0)),
            num_free_blocks=int(get("num_free_blocks", 0)),
            num_total_blocks=int(get("num_total_blocks", 0)),
            prefix_cache_queries=int(get("prefix_cache_queries", 0)),
            prefix_cache_hits=int(get("prefix_cache_hits", 0)),
            num_preemptions=int(get("num_preemptions", 0)),
            prompt_tokens=int(get("prompt_tokens_total", 0)),
            generation_tokens=int(get("generation_tokens_total", 0)),
            max_lora=int(get("max_lora", 0)),
            running_lora_adapters=tuple(get("running_lora_adapters", ()) or ()),
            waiting_lora_adapters=tuple(get("waiting_lora_adapters", ()) or ()),
            lora_requests=tuple(sorted((get("lora_requests_total", None) or {}).items())),
            lora_prompt_tokens=tuple(sorted((get("lora_prompt_tokens_total", None) or {}).items())),
            lora_generation_tokens=tuple(sorted((get("lora_generation_tokens_total", None) or {}).items())),
        )


class EngineStatsCollector(Collector):
    """Yields gauges/counters from `snapshot()` at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.snapshot = snapshot

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.snapshot()
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", s.kv_cache_usage)
        yield self._gauge("lmforge:kv_cache_free_blocks", "Free KV cache blocks.", s.num_free_blocks)
        yield self._gauge("lmforge:kv_cache_total_blocks", "KV cache blocks in the pool.", s.num_total_blocks)
        # CounterMetricFamily appends the `_total` suffix.
        yield self._counter("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Generated tokens.", s.generation_tokens)
        yield self._counter("vllm:num_preemptions", "Requests preempted (KV cache full).", s.num_preemptions)
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )
        yield self._counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits
        )
        if s.max_lora:
            yield from self._lora(s)

    def _lora(self, s: EngineStats) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """vLLM's info gauge (adapters running / waiting, as comma lists; value: the scrape time) and
        per-adapter counters labelled lora_name."""
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [str(s.max_lora), ",".join(s.running_lora_adapters), ",".join(s.waiting_lora_adapters)],
            time.time(),
        )
        yield info
        for name, doc, values in (
            ("lmforge:lora_requests", "Requests admitted, per LoRA adapter.", s.lora_requests),
            (
                "lmforge:lora_prompt_tokens",
                "Prompt tokens prefilled, per LoRA adapter.",
                s.lora_prompt_tokens,
            ),
            (
                "lmforge:lora_generation_tokens",
                "Tokens generated, per LoRA adapter.",
                s.lora_generation_tokens,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name", "lora_name"])
            for lora_name, value in values:
                family.add_metric([self.model_name, lora_name], value)
            yield family


class ServerMetrics:
    """One registry per server (tests run several apps in one process without name clashes)."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats]) -> None:
        disable_created_metrics()  # no `*_created` samples (vLLM does the same)
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(model_name, snapshot))
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to last output.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "lmforge:requests_rejected",
            "Requests refused, by reason.",
            ["model_name", "reason"],
            registry=self.registry,
        )

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int = 1) -> None:
        """`num_tokens` arrived together after `seconds`: each counts as seconds / num_tokens."""
        for _ in range(num_tokens):
            self.itl.observe(seconds / num_tokens)

    def observe_finished(self, e2e_seconds: float, finish_reason: str) -> None:
        self.e2e.observe(e2e_seconds)
        self._success.labels(self.model_name, finish_reason).inc()

    def observe_rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
