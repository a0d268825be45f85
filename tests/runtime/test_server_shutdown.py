"""Shutdown past the grace period: the server process runs FakeEngine (slow steps, no torch), so a
request can outlive --graceful-shutdown-seconds without minutes of real decoding."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow  # a server process (transformers import for its tokenizer)

SLOW_ENGINE = {"max_model_len": 4096, "step_delay_s": 0.02}  # ~50 tokens/s
ENDLESS = {"model": "tiny", "prompt": "hi", "max_tokens": 3000, "stream": True}


def _stream_events(server, events: list) -> None:
    with httpx.stream("POST", server.base_url + "/v1/completions", json=ENDLESS, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])


def _start_stream(server) -> tuple[threading.Thread, list[str]]:
    events: list[str] = []
    thread = threading.Thread(target=_stream_events, args=(server, events))
    thread.start()
    deadline = time.monotonic() + 30
    while len(events) < 3:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    return thread, events


def test_grace_period_over_aborts_in_flight_with_an_error_event_and_exits_0(server_factory):
    server = server_factory("--graceful-shutdown-seconds", "1", fake_engine=SLOW_ENGINE)
    thread, events = _start_stream(server)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert not thread.is_alive()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and "shut down" in error["message"]
    assert server.proc.wait(30) == 0, server.log()
    assert 1.0 <= time.monotonic() - started < 20
    assert "aborting them" in server.log()


def test_second_signal_skips_the_grace_period(server_factory):
    server = server_factory("--graceful-shutdown-seconds", "600", fake_engine=SLOW_ENGINE)
    thread, events = _start_stream(server)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None  # still draining
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(30) == 0, server.log()
    assert time.monotonic() - started < 20
    thread.join(30)
    assert events[-1] == "[DONE]"
