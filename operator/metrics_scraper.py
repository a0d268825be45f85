"""Reading the engine gauges the autoscaler needs from a pod's /metrics (Prometheus text).

`parse` is pure; `scrape` fetches many pods concurrently with a short timeout (aiohttp, which kopf
already depends on). The operator scrapes pods directly: no Prometheus, no adapter, no metric
renames between the engine and the decision.

Names: vLLM's, as `lmforge serve` exports them. Where vLLM renamed a gauge, the old name is read
too (`vllm:gpu_cache_usage_perc` became `vllm:kv_cache_usage_perc`), so an engine upgrade never
silently blinds the autoscaler. Samples of every `model_name` label are summed (one pod may serve
several names of one model).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from lmforge.operator.autoscaler import PodSample

# PodSample field -> accepted metric names, preferred first.
METRICS: dict[str, tuple[str, ...]] = {
    "waiting": ("vllm:num_requests_waiting",),
    "running": ("vllm:num_requests_running",),
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}
DEFAULT_URL_TEMPLATE = "http://{ip}:8000/metrics"
TIMEOUT_SECONDS = 2.0


class MetricsError(ValueError):
    """The text is not Prometheus exposition, or carries none of the engine gauges."""


def parse(text: str) -> PodSample:
    """Sum each gauge over its samples; a gauge that is absent reads 0 as long as one is present."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)
    except ValueError as exc:
        raise MetricsError(f"not Prometheus text: {exc}") from exc
    values: dict[str, float] = {}
    for attr, names in METRICS.items():
        name = next((n for n in names if n in found), None)
        if name is not None:
            values[attr] = found[name]
    if not values:
        raise MetricsError("none of " + ", ".join(n for names in METRICS.values() for n in names) + " found")
    return PodSample(**values)


def metrics_url(template: str | None, *, pod: str, ip: str | None, namespace: str, name: str) -> str | None:
    """Fill in a URL template ({pod}, {ip}, {namespace}, {name}); None when it needs an IP the pod
    does not have yet. Plain replacement: any other braces in the URL are left alone."""
    template = template or DEFAULT_URL_TEMPLATE
    if "{ip}" in template and not ip:
        return None
    for key, value in (("{pod}", pod), ("{ip}", ip or ""), ("{namespace}", namespace), ("{name}", name)):
        template = template.replace(key, value)
    return template


async def scrape(
    urls: Mapping[str, str], session: Any = None, timeout: float = TIMEOUT_SECONDS
) -> dict[str, PodSample | None]:
    """GET every url concurrently: pod -> its sample, or None when it did not answer in time,
    answered non-200, or without engine gauges."""
    import aiohttp

    async def one(http: aiohttp.ClientSession, url: str) -> PodSample | None:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    return None
                return parse(await response.text())
        except (TimeoutError, aiohttp.ClientError, MetricsError, UnicodeDecodeError):
            return None

    if not urls:
        return {}
    if session is None:
        async with aiohttp.ClientSession() as own:
            results = await asyncio.gather(*(one(own, url) for url in urls.values()))
    else:
        results = await asyncio.gather(*(one(session, url) for url in urls.values()))
    return dict(zip(urls.keys(), results, strict=True))
