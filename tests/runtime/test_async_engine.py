"""AsyncLLM against a fake engine: threading contract, cancellation, queue bound, failures."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from lmforge.runtime.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
)
from lmforge.runtime.sampling_params import SamplingParams


class Recorder:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[tuple[float, int]] = []
        self.finished: list[str] = []

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int = 1) -> None:
        self.itl.append((seconds, num_tokens))

    def observe_finished(self, e2e_seconds: float, finish_reason: str) -> None:
        self.finished.append(finish_reason)


def run(coro_fn, engine_factory, **kwargs):
    """Runs `coro_fn(llm)` with a started, loaded AsyncLLM; shuts it down afterwards."""

    async def main():
        llm = AsyncLLM(engine_factory, **kwargs)
        llm.start()
        await llm.wait_loaded(timeout=10)
        try:
            return await coro_fn(llm)
        finally:
            await llm.shutdown()

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


async def wait_idle(llm: AsyncLLM, timeout_s: float = 10.0):
    for _ in range(int(timeout_s / 0.01)):
        stats = llm.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {llm.stats()}")


async def collect(llm: AsyncLLM, prompt, params: SamplingParams, request_id: str | None = None):
    return [out async for out in llm.generate(prompt, params, request_id)]


def test_generate_yields_cumulative_outputs_until_finished(fake_engine_cls):
    async def body(llm: AsyncLLM):
        outs = await collect(llm, [1, 2, 3], SamplingParams(max_tokens=5, n=2), "r1")
        stats = await wait_idle(llm)
        return outs, stats, llm.engine

    outs, stats, engine = run(body, lambda: fake_engine_cls())
    final = outs[-1]
    assert final.finished and [o.finished for o in outs].count(True) == 1
    assert [c.token_ids for c in final.outputs] == [[3, 4, 5, 6, 7], [4, 5, 6, 7, 8]]
    assert [c.text for c in final.outputs] == ["defgh", "efghi"]
    assert [c.finish_reason for c in final.outputs] == ["length", "length"]
    assert stats.num_free_blocks == stats.num_total_blocks == 64
    # every engine call ran on the one engine thread
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_closing_the_stream_aborts_and_frees_blocks(fake_engine_cls):
    async def body(llm: AsyncLLM):
        gen = llm.generate([1], SamplingParams(max_tokens=40), "r1")
        first = await anext(gen)
        await gen.aclose()
        stats = await wait_idle(llm)
        return first, stats, llm.engine

    first, stats, engine = run(body, lambda: fake_engine_cls(step_delay_s=0.005))
    assert not first.finished
    assert stats.num_free_blocks == 64 and not engine.running and not engine.waiting


def test_many_cancelled_requests_return_every_block(fake_engine_cls):
    async def body(llm: AsyncLLM):
        tasks = [
            asyncio.ensure_future(collect(llm, [i % 7 + 1] * (i % 5 + 1), SamplingParams(max_tokens=30)))
            for i in range(200)
        ]
        await asyncio.sleep(0.3)  # some finished, some mid-stream, most still waiting
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, await wait_idle(llm)

    results, stats = run(body, lambda: fake_engine_cls(max_num_seqs=8, step_delay_s=0.002))
    assert any(isinstance(r, asyncio.CancelledError) for r in results)
    assert stats.num_free_blocks == stats.num_total_blocks


def test_queue_bound_rejects_beyond_max_queue(fake_engine_cls):
    async def body(llm: AsyncLLM):
        running = llm.generate([1], SamplingParams(max_tokens=500), "running")
        await anext(running)  # scheduled: not waiting any more
        waiting = asyncio.ensure_future(collect(llm, [1], SamplingParams(max_tokens=5), "waiting"))
        while llm.stats().num_waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await collect(llm, [1], SamplingParams(max_tokens=5), "rejected")
        waiting.cancel()
        await running.aclose()
        await wait_idle(llm)
        return await collect(llm, [1], SamplingParams(max_tokens=2), "later")  # room again

    outs = run(body, lambda: fake_engine_cls(max_num_seqs=1, step_delay_s=0.005), max_queue=1)
    assert outs[-1].finished


def test_engine_rejection_and_step_failure_do_not_stop_the_loop(fake_engine_cls):
    async def body(llm: AsyncLLM):
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(llm, list(range(100)), SamplingParams(max_tokens=2))
        llm.engine.fail_steps = 1  # the loop thread reads it on its next step
        with pytest.raises(RequestAbortedError):
            await collect(llm, [1], SamplingParams(max_tokens=3))
        outs = await collect(llm, [1], SamplingParams(max_tokens=3))
        return outs[-1], await wait_idle(llm)

    final, stats = run(body, lambda: fake_engine_cls())
    assert final.finished and len(final.outputs[0].token_ids) == 3
    assert stats.num_free_blocks == 64


def test_repeated_step_failures_mark_the_engine_dead(fake_engine_cls):
    async def body(llm: AsyncLLM):
        llm.engine.fail_steps = 100
        for _ in range(3):
            with pytest.raises(RequestAbortedError):
                await collect(llm, [1], SamplingParams(max_tokens=3))
        assert llm.is_dead
        with pytest.raises(EngineDeadError):
            await collect(llm, [1], SamplingParams(max_tokens=3))

    run(body, lambda: fake_engine_cls())


def test_shutdown_aborts_running_and_refuses_new(fake_engine_cls):
    async def body(llm: AsyncLLM):
        gen = llm.generate([1], SamplingParams(max_tokens=1000), "long")
        await anext(gen)
        await llm.shutdown()
        with pytest.raises(RequestAbortedError):
            async for _ in gen:
                pass
        with pytest.raises(EngineNotReadyError):
            await collect(llm, [1], SamplingParams(max_tokens=1))

    run(body, lambda: fake_engine_cls(step_delay_s=0.002))


def test_load_failure_is_reported():
    def broken():
        raise OSError("no such checkpoint")

    async def main():
        llm = AsyncLLM(broken)
        llm.start()
        with pytest.raises(EngineDeadError, match="no such checkpoint"):
            await llm.wait_loaded(timeout=10)
        assert llm.is_dead and not llm.is_ready
        with pytest.raises(EngineDeadError):
            await collect(llm, [1], SamplingParams())
        await llm.shutdown()

    asyncio.run(main())


def test_latency_observer_sees_first_token_inter_token_and_finish(fake_engine_cls):
    recorder = Recorder()

    async def body(llm: AsyncLLM):
        await collect(llm, [1], SamplingParams(max_tokens=4))
        gen = llm.generate([1], SamplingParams(max_tokens=50))
        await anext(gen)
        await gen.aclose()
        with contextlib.suppress(Exception):
            await wait_idle(llm)

    # 20 ms a step: the 50-token request must still be running when the client closes it, even
    # on a loaded machine (without a delay the fake engine can finish it before the abort lands).
    run(body, lambda: fake_engine_cls(step_delay_s=0.02), observer=recorder)
    assert len(recorder.ttft) == 2
    assert sum(n for _, n in recorder.itl[:3]) == 3  # tokens 2..4 of the first request
    assert recorder.finished == ["length", "abort"]
