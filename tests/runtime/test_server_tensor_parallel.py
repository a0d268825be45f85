"""`lmforge serve --tensor-parallel-size 2` on CPU (gloo): the same greedy answer as one rank through the
real HTTP API, 200 cancelled streams leave every KV block free (one block table on rank 0 drives every
rank's cache; the answer after them is still the same), a killed worker makes the server fail the
in-flight request and exit non-zero within seconds, and SIGTERM stops every rank."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow  # real server processes (torch import + model load, per rank)

FREE = 'lmforge:kv_cache_free_blocks{model_name="tiny"}'
TOTAL = 'lmforge:kv_cache_total_blocks{model_name="tiny"}'
PROMPT = "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values"


def _worker_pids(server, timeout_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"worker pids \[([\d, ]+)\]", server.log())
        if found:
            return [int(p) for p in found.group(1).split(",")]
        time.sleep(0.1)
    raise AssertionError(server.log())


def _greedy(server) -> list[str]:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 2,
    }
    choice = server.post("/v1/completions", json=body).json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


@pytest.fixture(scope="module")
def tp_server(tiny_model_dir, tmp_path_factory, launch_server):
    proc = launch_server(
        tiny_model_dir, tmp_path_factory.mktemp("tp"), "--tensor-parallel-size", "2", "--num-blocks", "256"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_greedy_answer_matches_one_rank(server, tp_server):
    tokens, logprobs = _greedy(tp_server)
    ref_tokens, ref_logprobs = _greedy(server)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-4


def test_200_cancelled_streams_return_every_kv_block(tp_server):
    before = tp_server.metrics()
    assert before[FREE] == before[TOTAL] > 0
    answer = _greedy(tp_server)

    async def hang_up(client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int) -> None:
        body = {
            "model": "tiny",
            "prompt": f"{PROMPT} {i}",
            "max_tokens": 64,
            "stream": True,
            "ignore_eos": True,
        }
        async with sem, client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events >= 1 + i % 3:
                        break  # hang up mid-stream

    async def main() -> None:
        sem = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=tp_server.base_url, timeout=120) as client:
            await asyncio.gather(*(hang_up(client, sem, i) for i in range(200)))

    asyncio.run(main())
    deadline = time.monotonic() + 60
    while tp_server.metrics()[FREE] != before[FREE] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tp_server.metrics()[FREE] == before[FREE], "KV blocks leaked by cancelled requests"
    assert _greedy(tp_server) == answer  # every rank's cache still agrees with the block table


def test_a_killed_worker_fails_the_request_and_the_server_exits_nonzero(server_factory):
    srv = server_factory("--tensor-parallel-size", "2", "--num-blocks", "256")
    (worker,) = _worker_pids(srv)
    client = srv.openai()
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))  # the request is running
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017, PT011 - an error event or a dropped connection, never a hang
        for _ in stream:
            pass
    assert srv.proc.wait(timeout=20) != 0, srv.log()
    assert time.monotonic() - killed < 20
    assert "tensor parallel worker rank 1" in srv.log()


def test_sigterm_stops_every_rank(server_factory):
    srv = server_factory("--tensor-parallel-size", "2", "--num-blocks", "64")
    workers = _worker_pids(srv)
    assert srv.stop() == 0, srv.log()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < deadline, "a worker outlived the server"
        time.sleep(0.1)
