"""Parsing vLLM metrics text and scraping pods over HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.operator.autoscaler import PodSample
from lmforge.operator.metrics_scraper import MetricsError, metrics_url, parse, scrape

VLLM_TEXT = """\
# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="chat"} 7.0
# HELP vllm:num_requests_waiting Requests waiting to be scheduled.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="chat"} 3.0
vllm:num_requests_waiting{model_name="chat-alias"} 2.0
# HELP vllm:kv_cache_usage_perc KV cache usage (1 = full).
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="chat"} 0.42
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="chat"} 1234.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="chat"} 3.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="chat"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="chat"} 4.0
vllm:e2e_request_latency_seconds_sum{model_name="chat"} 2.5
"""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param(VLLM_TEXT, PodSample(waiting=5.0, running=7.0, kv_cache=0.42), id="lmforge-serve"),
        pytest.param(
            'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_waiting 1\n',
            PodSample(waiting=1.0, kv_cache=0.5),
            id="older-vllm-kv-name",
        ),
        pytest.param(
            "vllm:kv_cache_usage_perc 0.25\nvllm:gpu_cache_usage_perc 0.9\n",
            PodSample(kv_cache=0.25),
            id="new-name-preferred",
        ),
    ],
)
def test_parse(text: str, want: PodSample) -> None:
    assert parse(text) == want


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("process_cpu_seconds_total 3\n", id="no-engine-gauges"),
        pytest.param("<html>not metrics</html>", id="not-prometheus"),
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(MetricsError):
        parse(text)


def test_metrics_url() -> None:
    assert (
        metrics_url(None, pod="p", ip="10.0.0.3", namespace="ns", name="chat")
        == "http://10.0.0.3:8000/metrics"
    )
    assert metrics_url(None, pod="p", ip=None, namespace="ns", name="chat") is None
    assert (
        metrics_url(
            "http://127.0.0.1:9/m?pod={pod}&ns={namespace}&isvc={name}&x={other}",
            pod="p",
            ip=None,
            namespace="ns",
            name="chat",
        )
        == "http://127.0.0.1:9/m?pod=p&ns=ns&isvc=chat&x={other}"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if "slow" in self.path:
                threading.Event().wait(1.0)
            status, body = (200, VLLM_TEXT) if "good" in self.path else (500, "boom")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the slow handler writes to a client that gave up: expected

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_scrape_many_pods_some_failing(server: str) -> None:
    urls = {
        "a": f"{server}/good",
        "b": f"{server}/bad",
        "c": f"{server}/good-slow",
        "d": "http://127.0.0.1:1/x",
    }
    got = asyncio.run(scrape(urls, timeout=0.3))
    assert got == {"a": PodSample(waiting=5.0, running=7.0, kv_cache=0.42), "b": None, "c": None, "d": None}
    assert asyncio.run(scrape({})) == {}
