"""1000 streamed requests whose clients hang up mid-stream leave no KV block behind.

Checked through the server only (/metrics: lmforge:kv_cache_free_blocks), never by poking the engine.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)

NUM_REQUESTS = 1000
CONCURRENCY = 48
MAX_TOKEN_ID = 256  # random prompt ids stay below the tiny model's vocabulary (384)


def _wait_idle(server, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = server.metrics()
        if (
            m['vllm:num_requests_running{model_name="tiny"}'] == 0
            and m['vllm:num_requests_waiting{model_name="tiny"}'] == 0
        ):
            return m
        time.sleep(0.05)
    raise AssertionError(f"server not idle: {server.metrics()}")


async def _hang_up_mid_stream(client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int) -> int:
    """Streams a request with a random 8..60-token prompt and closes it after 1..3 events."""
    rng = random.Random(i)
    prompt = [rng.randrange(3, MAX_TOKEN_ID) for _ in range(rng.randint(8, 60))]
    if i % 2:
        path, body = "/v1/completions", {"prompt": prompt}
    else:
        text = (await client.post("/detokenize", json={"tokens": prompt})).json()["prompt"]
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    body.update(model="tiny", max_tokens=100, stream=True, ignore_eos=True, temperature=1.0, seed=i)
    async with sem:
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200, await response.aread()
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events >= 1 + i % 3:
                        break  # leaving the block closes the connection mid-stream
    return events


def test_1000_cancelled_streams_return_every_kv_block(server):
    before = _wait_idle(server)
    free_key, total_key = (
        'lmforge:kv_cache_free_blocks{model_name="tiny"}',
        'lmforge:kv_cache_total_blocks{model_name="tiny"}',
    )
    assert before[free_key] == before[total_key] > 0

    async def main() -> list[int]:
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_hang_up_mid_stream(client, sem, i) for i in range(NUM_REQUESTS)))

    started = time.monotonic()
    events = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert len(events) == NUM_REQUESTS and min(events) >= 1

    after = _wait_idle(server)
    assert after[free_key] == before[free_key], "KV blocks leaked by cancelled requests"
    aborted = after.get(
        'vllm:request_success_total{finished_reason="abort",model_name="tiny"}', 0.0
    ) - before.get('vllm:request_success_total{finished_reason="abort",model_name="tiny"}', 0.0)
    assert aborted >= 0.9 * NUM_REQUESTS, f"only {aborted} aborted: the clients did not hang up mid-stream"
    assert elapsed < 240, f"{NUM_REQUESTS} cancelled streams took {elapsed:.0f}s"
    assert server.get("/health").status_code == 200
