"""Process-level behaviour: 503 while loading, graceful SIGTERM, API key, --max-queue."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)

LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_503_while_loading_then_sigterm_drains_in_flight_and_exits_0(server_factory):
    server = server_factory(wait=False)
    statuses = []

    def health() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(server.log())
        try:
            response = httpx.get(server.base_url + "/health", timeout=5)
        except httpx.TransportError:
            return False
        statuses.append((response.status_code, response.json()["status"]))
        return response.status_code == 200

    _wait_for(health, 180, "health 200")
    assert statuses[0] == (503, "loading") and statuses[-1] == (200, "ok")

    result = {}

    def in_flight() -> None:
        result["response"] = server.post("/v1/completions", json=LONG)

    thread = threading.Thread(target=in_flight)
    thread.start()
    _wait_for(lambda: server.metric("vllm:num_requests_running") >= 1, what="request running")
    server.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: server.get("/health").status_code == 503, 10, "health 503 after SIGTERM")
    refused = server.post("/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    thread.join(60)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0, server.log()
    assert "draining 1 in-flight request(s)" in server.log()


@pytest.fixture(scope="module")
def guarded(launch_server, tiny_model_dir, tmp_path_factory):
    """One sequence at a time, one waiting at most, and an API key."""
    proc = launch_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("guarded"),
        "--max-num-seqs",
        "1",
        "--max-queue",
        "1",
        api_key="s3cret",
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_api_key_required_on_api_routes_only(guarded):
    bare = httpx.post(
        guarded.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=10
    )
    assert bare.status_code == 401
    error = bare.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "authentication_error"
    wrong = httpx.get(guarded.base_url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in guarded.openai().models.list().data] == ["tiny"]
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(guarded.base_url + open_path, timeout=10).status_code == 200


def test_queue_over_max_queue_gets_429(guarded):
    headers = {"Authorization": "Bearer s3cret"}

    async def scenario():
        async with httpx.AsyncClient(base_url=guarded.base_url, headers=headers, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()
                await anext(lines)  # first token out: this one runs, the next one has to wait
                waiting = asyncio.ensure_future(client.post("/v1/completions", json=LONG))
                for _ in range(500):
                    if (await client.get("/metrics")).text.count(
                        'vllm:num_requests_waiting{model_name="tiny"} 1.0'
                    ):
                        break
                    await asyncio.sleep(0.02)
                rejected = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
                waiting.cancel()
            return rejected

    rejected = asyncio.run(scenario())
    assert rejected.status_code == 429, rejected.text
    error = rejected.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):  # the openai client maps it too
        _saturate_and_call(guarded)
    _wait_for(
        lambda: (
            guarded.metric("vllm:num_requests_running") == 0
            and guarded.metric("vllm:num_requests_waiting") == 0
        ),
        30,
        "idle",
    )
    assert guarded.metric("lmforge:requests_rejected_total") >= 2


def _saturate_and_call(server) -> None:
    """Same as above through the openai client: one running, one waiting, then the client call."""
    client = server.openai()
    stream = client.completions.create(
        **{k: v for k, v in LONG.items() if k != "ignore_eos"}, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    blocker = threading.Thread(target=lambda: _swallow(client))
    blocker.start()
    try:
        _wait_for(lambda: server.metric("vllm:num_requests_waiting") >= 1, 30, "a waiting request")
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        stream.close()
        blocker.join(60)


def _swallow(client) -> None:
    try:
        client.completions.create(model="tiny", prompt="wait", max_tokens=3)
    except openai.OpenAIError:
        pass


def test_sigterm_while_loading_exits_0_at_once(server_factory):
    server = server_factory(wait=False)
    _wait_for(lambda: _health_status(server) == 503, 120, "the listener (model still loading)")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()


def test_bad_model_dir_fails_fast(tmp_path, launch_server):
    missing = launch_server(tmp_path / "nowhere", tmp_path, wait=False)
    assert missing.proc.wait(60) == 2 and "not a model directory" in missing.log()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-arch"}')
    failed = launch_server(broken, tmp_path, wait=False)
    assert failed.proc.wait(180) == 1, failed.log()
    assert "model failed to load" in failed.log()


def _health_status(server) -> int | None:
    if server.proc.poll() is not None:
        raise AssertionError(server.log())
    try:
        return httpx.get(server.base_url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return None
