"""AsyncLLM: the synchronous LLMEngine driven by one background thread, consumed from asyncio.

Threading contract (the engine is not thread-safe):
- every engine call (construction, add_request, abort_request, step, get_stats) happens on the
  engine thread `lmforge-engine`;
- the event loop talks to it only through `_commands` (a thread-safe FIFO of _Add/_Abort/_Stop),
  so an abort always reaches the engine after the add it cancels;
- the engine thread hands outputs back once per step with one `loop.call_soon_threadsafe`, into a
  per-request asyncio.Queue;
- `_stats` (an immutable EngineStats) and `_num_pending` (adds not yet handed to the engine) are
  swapped together under `_lock`, so `num_waiting()` never undercounts.

A request whose consumer goes away (client disconnect -> CancelledError / GeneratorExit in
`generate`) is aborted, which returns its KV blocks to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmforge.runtime.metrics import EngineStats
from lmforge.runtime.outputs import RequestOutput
from lmforge.runtime.sampling_params import SamplingParams

logger = logging.getLogger("lmforge.runtime.async_engine")

# Consecutive failed steps after which the engine is declared dead (requests get EngineDeadError).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineNotReadyError(RuntimeError):
    """The model is still loading (or the engine is shutting down)."""


class EngineDeadError(RuntimeError):
    """The engine failed to load or kept failing; it takes no more requests."""


class QueueFullError(RuntimeError):
    """`max_queue` requests are already waiting."""


class RequestAbortedError(RuntimeError):
    """The engine dropped the request (engine shutdown or a failed step)."""


class LatencyObserver(Protocol):
    def observe_first_token(self, seconds: float) -> None: ...
    def observe_inter_token(self, seconds: float, num_tokens: int = 1) -> None: ...
    def observe_finished(self, e2e_seconds: float, finish_reason: str) -> None: ...


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic()
    lora_request: Any = None  # LoRARequest: the adapter it runs with (None: the base model)


@dataclass(slots=True)
class _Call:
    """Runs fn(engine) on the engine thread between steps (LoRA load/unload); its result or exception
    resolves `future` on the loop."""

    fn: Callable[[Any], Any]
    future: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Stop:
    pass


@dataclass(slots=True)
class _Timing:
    """Engine-thread bookkeeping of one live request."""

    arrival_time: float
    last_token_time: float = 0.0
    num_steps_out: int = 0  # longest sample's generated length seen so far


@dataclass(slots=True)
class _Stream:
    """Loop-side end of one request."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy the loop thread may read while the engine keeps mutating its own objects."""
    out = copy.copy(output)
    out.prompt_token_ids = list(output.prompt_token_ids)
    if output.prompt_logprobs is not None:  # its dicts are never mutated once delivered
        out.prompt_logprobs = list(output.prompt_logprobs)
    out.outputs = []
    for completion in output.outputs:
        c = copy.copy(completion)
        c.token_ids = list(completion.token_ids)
        if completion.logprobs is not None:
            c.logprobs = list(completion.logprobs)
        out.outputs.append(c)
    return out


def _coalesce(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Outputs are cumulative, so the newer one wins; samples it lacks are carried over."""
    have = {c.index for c in newer.outputs}
    missing = [c for c in older.outputs if c.index not in have]
    if missing:
        newer.outputs = sorted(newer.outputs + missing, key=lambda c: c.index)
    return newer


class AsyncLLM:
    """`engine_factory()` builds the engine on the engine thread (loading happens there)."""

    def __init__(
        self,
        engine_factory: Callable[[], Any],
        *,
        max_queue: int | None = None,
        observer: LatencyObserver | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._engine_factory = engine_factory
        # called on the event loop when the engine reports a fatal failure (a tensor-parallel worker
        # died or hung): every stream has already ended with EngineDeadError
        self._on_fatal = on_fatal
        self.max_queue = max_queue
        self.observer = observer
        self.engine: Any = None  # set once loaded; read only immutable config from other threads
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop | _Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._num_pending = 0
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = threading.Event()
        self._accepting = False
        self._stopping = False
        self.error: BaseException | None = None

    # --- lifecycle (event loop side) ---------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume outputs."""
        assert self._thread is None, "AsyncLLM already started"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    async def wait_loaded(self, timeout: float | None = None) -> None:
        """Returns once the engine is up; raises EngineDeadError if loading failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._loaded.is_set():  # polled, so that cancelling the wait needs no thread
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("engine did not load in time")
            await asyncio.sleep(0.05)
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}") from self.error

    @property
    def is_ready(self) -> bool:
        return self._accepting and self.error is None

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the engine thread; requests still running end with RequestAbortedError."""
        self._accepting = False
        self._stopping = True
        if self._thread is None:
            return
        self._commands.put(_Stop())
        if not self._loaded.is_set():
            return  # still loading: the thread stops by itself once loaded; nothing to wait for
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.0fs", timeout)

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- requests (event loop side) ----------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Latest engine counters; num_waiting includes adds the engine has not taken yet."""
        with self._lock:
            stats, pending = self._stats, self._num_pending
        if pending:
            stats = _replace_waiting(stats, stats.num_waiting + pending)
        return stats

    def num_waiting(self) -> int:
        return self.stats().num_waiting

    def num_unfinished(self) -> int:
        return len(self._streams)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(engine) on the engine thread, between two steps (never concurrent with a forward)."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        if not self._accepting:
            raise EngineNotReadyError("shutting down" if self._stopping else "model is loading")
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, future))
        return await future

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        lora_request: Any = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields cumulative RequestOutputs (intermediate ones may be skipped) until finished.

        Raises EngineNotReadyError / EngineDeadError / QueueFullError before yielding anything,
        ValueError when the engine rejects the request, RequestAbortedError if it drops it.
        Closing or cancelling the iterator aborts the request in the engine.
        """
        request_id = request_id or uuid.uuid4().hex
        self._admit(request_id)
        stream = _Stream()
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt, params, time.monotonic(), lora_request))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                while isinstance(item, RequestOutput) and not item.finished and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    item = _coalesce(item, later) if isinstance(later, RequestOutput) else later
                if isinstance(item, BaseException):
                    finished = True  # the engine no longer holds it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        """Aborts a request from the loop side (its generate() then sees no more outputs)."""
        self._commands.put(_Abort(request_id))

    def _admit(self, request_id: str) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        if not self._accepting:
            raise EngineNotReadyError("shutting down" if self._stopping else "model is loading")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        with self._lock:
            waiting = self._stats.num_waiting + self._num_pending
            if self.max_queue is not None and waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests are already waiting (--max-queue {self.max_queue})")
            self._num_pending += 1

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Runs on the loop: routes engine-thread results to their streams."""
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(item)

    # --- engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._load()
        if engine is None:
            return
        live: dict[str, _Timing] = {}
        failures = 0
        while True:
            commands = self._next_commands(block=not engine.has_unfinished_requests())
            outbox: list[tuple[str, RequestOutput | BaseException]] = []
            num_adds, stop = self._apply(engine, commands, live, outbox)
            if stop:
                self._publish_stats(engine, num_adds)
                self._abort_all(engine, live, outbox, RequestAbortedError("engine shut down"))
                self._send(outbox)
                self._close_engine(engine)
                return
            if engine.has_unfinished_requests():
                failures = self._step(engine, live, outbox, failures)
            self._publish_stats(engine, num_adds)
            self._send(outbox)
            if self.error is not None:
                self._drain_dead(engine)
                self._close_engine(engine)
                return

    def _fatal(self, reason: str) -> None:
        """Any thread (the tensor-parallel watchdog): the engine is gone for good. Fail every stream
        now, from the loop, since the engine thread may be stuck in a collective that never returns."""
        error = EngineDeadError(f"engine failed: {reason}")
        self.error = self.error or error
        self._accepting = False

        def fail_all() -> None:
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(error)
            if self._on_fatal is not None:
                self._on_fatal(reason)

        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fail_all)

    @staticmethod
    def _close_engine(engine: Any) -> None:
        """The engine thread's last act: stop what the engine started (tensor-parallel workers)."""
        close = getattr(engine, "shutdown", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")

    def _load(self) -> Any:
        """The engine from the factory, or None after reporting why it did not load (wait_loaded / health)."""
        try:
            engine = self._engine_factory()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_loaded / health
            logger.exception("engine failed to load")
            self.error = exc
            self._loaded.set()
            return None
        self.engine = engine
        if hasattr(engine, "add_fatal_callback"):
            engine.add_fatal_callback(self._fatal)
        self._publish_stats(engine, num_adds=0)
        self._accepting = not self._stopping
        self._loaded.set()
        logger.info("engine loaded")
        return engine

    def _step(
        self,
        engine: Any,
        live: dict[str, _Timing],
        outbox: list[tuple[str, RequestOutput | BaseException]],
        failures: int,
    ) -> int:
        """One engine step, its outputs queued in `outbox`; -> the consecutive failures so far. A failed
        step fails its batch and the engine keeps serving, until MAX_CONSECUTIVE_STEP_FAILURES in a row
        mark it dead (self.error)."""
        try:
            outputs = engine.step()
            failures = 0
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            failures += 1
            logger.exception("engine step failed (%d in a row)", failures)
            self._abort_all(engine, live, outbox, RequestAbortedError(f"engine step failed: {exc}"))
            if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                self.error = exc
            outputs = []
        now = time.monotonic()
        for output in outputs:
            timing = live.get(output.request_id)
            if timing is None:
                continue  # aborted while the step ran
            self._observe(timing, output, now)
            if output.finished:
                del live[output.request_id]
            outbox.append((output.request_id, _snapshot(output)))
        return failures

    def _next_commands(self, block: bool) -> list[_Add | _Abort | _Stop | _Call]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, engine: Any, commands: list, live: dict[str, _Timing], outbox: list) -> tuple[int, bool]:
        num_adds, stop = 0, False
        for command in commands:
            if isinstance(command, _Add):
                num_adds += 1
                lora = {} if command.lora_request is None else {"lora_request": command.lora_request}
                try:
                    engine.add_request(command.request_id, command.prompt, command.params, **lora)
                except Exception as exc:  # noqa: BLE001 - a bad request must not stop the loop
                    outbox.append(
                        (command.request_id, exc if isinstance(exc, ValueError) else ValueError(str(exc)))
                    )
                    continue
                live[command.request_id] = _Timing(arrival_time=command.arrival_time)
            elif isinstance(command, _Call):
                self._resolve(command, engine)
            elif isinstance(command, _Abort):
                timing = live.pop(command.request_id, None)
                if timing is not None:
                    self._engine_abort(engine, command.request_id)
                    if self.observer is not None:
                        self.observer.observe_finished(time.monotonic() - timing.arrival_time, "abort")
            else:
                stop = True
        return num_adds, stop

    def _resolve(self, command: _Call, engine: Any) -> None:
        try:
            result, error = command.fn(engine), None
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            result, error = None, exc
        future = command.future

        def settle() -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _observe(self, timing: _Timing, output: RequestOutput, now: float) -> None:
        if self.observer is None:
            return
        num_steps_out = max((len(c.token_ids) for c in output.outputs), default=0)
        new = num_steps_out - timing.num_steps_out
        if new > 0:
            if timing.num_steps_out == 0:
                self.observer.observe_first_token(now - timing.arrival_time)
                if new > 1:
                    self.observer.observe_inter_token(0.0, new - 1)
            else:
                self.observer.observe_inter_token(now - timing.last_token_time, new)
            timing.num_steps_out, timing.last_token_time = num_steps_out, now
        if output.finished:
            reasons = [c.finish_reason for c in output.outputs if c.finish_reason]
            self.observer.observe_finished(now - timing.arrival_time, reasons[0] if reasons else "abort")

    def _abort_all(self, engine: Any, live: dict[str, _Timing], outbox: list, error: BaseException) -> None:
        now = time.monotonic()
        for request_id, timing in live.items():
            self._engine_abort(engine, request_id)
            outbox.append((request_id, error))
            if self.observer is not None:
                self.observer.observe_finished(now - timing.arrival_time, "abort")
        live.clear()

    @staticmethod
    def _engine_abort(engine: Any, request_id: str) -> None:
        try:
            engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - already finished / unknown ids are fine
            logger.debug("abort of %s ignored", request_id, exc_info=True)

    def _publish_stats(self, engine: Any, num_adds: int) -> None:
        try:
            stats = EngineStats.from_engine(engine.get_stats())
        except Exception:  # noqa: BLE001 - keep the previous snapshot
            logger.exception("engine get_stats failed")
            stats = self._stats
        with self._lock:
            self._stats = stats
            self._num_pending -= num_adds

    def _send(self, outbox: list) -> None:
        if outbox and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver, outbox)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _drain_dead(self, engine: Any) -> None:
        """After death: answer every queued add with EngineDeadError until stopped."""
        error = EngineDeadError(f"engine failed: {self.error}")
        while True:
            command = self._commands.get()
            if isinstance(command, _Add):
                self._publish_stats(engine, 1)
                self._send([(command.request_id, error)])
            elif isinstance(command, _Call):
                self._resolve(_Call(_raiser(error), command.future), engine)
            elif isinstance(command, _Stop):
                return


def _raiser(error: BaseException) -> Callable[[Any], Any]:
    def fail(_: Any) -> Any:
        raise error

    return fail


async def start_streams(gens: list[AsyncGenerator[RequestOutput, None]]) -> list[RequestOutput]:
    """Starts several generate() streams together and returns each one's first output; if any
    fails (queue full, rejected), closes them all (aborting the others) and raises its error."""
    results = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        raise errors[0]
    return results  # type: ignore[return-value]


async def merge_streams(
    gens: list[AsyncGenerator[RequestOutput, None]], firsts: list[RequestOutput]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(stream index, output) from streams started by start_streams, as outputs arrive. Closing
    the merged iterator closes every stream."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(gens) == 1:  # the common case: no helper tasks
        async with contextlib.aclosing(gens[0]) as gen:
            if not firsts[0].finished:
                async for out in gen:
                    yield 0, out
        return
    async with contextlib.aclosing(_interleave(gens, firsts)) as merged:  # closed with this iterator
        async for item in merged:
            yield item


async def _interleave(
    gens: list[AsyncGenerator[RequestOutput, None]], firsts: list[RequestOutput]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """merge_streams of several streams: one `anext` task per unfinished stream, outputs in the order
    they arrive; every stream is closed at the end."""
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens) if not firsts[i].finished}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(gens[i]))] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for g in gens:
            await g.aclose()


def _replace_waiting(stats: EngineStats, num_waiting: int) -> EngineStats:
    from dataclasses import replace

    return replace(stats, num_waiting=num_waiting)
