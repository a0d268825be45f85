"""LLMEngine: the synchronous core. add_request / abort_request / step, used from one thread.

    engine = LLMEngine(EngineArgs(model="path/to/checkpoint", device="cpu", dtype="float32"))
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():   # cumulative text/token_ids of every request that advanced
            ...

Each `step()` is one scheduler step (a forward pass over a mixed prefill/decode batch).

Async scheduling (`EngineArgs.async_scheduling`, on by default on CUDA): `step()` schedules and
launches step n, then finishes step n-1 (waits for its token ids, stop checks, detokenization,
outputs) while step n runs, so the host work of a step hides behind the device work of the one before.
The scheduler sees each in-flight token as a placeholder (`Sequence.num_pending`) and the device part
of step n reads the ids step n-1 sampled straight from its token tensor. Stop checks trail one step: a
sequence that stopped at n-1 may have run in step n too, and that token is dropped, so greedy and
seeded outputs are the same token for token with and without it (an unseeded sampled row's noise
depends on the batch around it either way). Steps of requests with penalties or a grammar (they
need the previous token on the host before the next draw) run synchronously.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.runtime.engine.block_manager import BlockManager, max_blocks_per_seq, reusable_window
from lmforge.runtime.engine.config import EngineArgs, resolve_device, resolve_dtype
from lmforge.runtime.engine.detokenizer import IncrementalDetokenizer, NullDetokenizer
from lmforge.runtime.engine.guided import GuidedDecoder
from lmforge.runtime.engine.model_runner import ModelRunner, ModelRunnerOutput, StepHandle
from lmforge.runtime.engine.pooler import Pooler
from lmforge.runtime.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lmforge.runtime.engine.sequence import FinishReason, Request, Sequence
from lmforge.runtime.engine.tp_executor import TPDriver, WorkerFailedError
from lmforge.runtime.engine.tp_worker import WorkerSpec
from lmforge.runtime.lora.request import LoRARequest
from lmforge.runtime.models.config import ModelConfig, load_model_config
from lmforge.runtime.models.layers import rope_block_salt
from lmforge.runtime.models.parallel import TPGroup, TPLayout, check_parallel_support
from lmforge.runtime.models.registry import as_causal_lm, get_model_class
from lmforge.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from lmforge.runtime.pooling_params import PoolerConfig
from lmforge.runtime.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineStats:
    num_running: int  # requests with at least one sequence running
    num_waiting: int  # requests not yet (or no longer, after preemption) running
    kv_cache_usage: float  # 0..1, fraction of KV blocks not free
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found cached
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    max_lora: int = 0  # LoRA slots (0: LoRA off)
    running_lora_adapters: tuple[str, ...] = ()  # adapters of running requests
    waiting_lora_adapters: tuple[str, ...] = ()  # adapters of waiting requests
    lora_requests_total: dict[str, int] | None = None  # adapter name -> requests finished or started
    lora_prompt_tokens_total: dict[str, int] | None = None
    lora_generation_tokens_total: dict[str, int] | None = None


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        device = resolve_device(args.device)
        self.model_config: ModelConfig = load_model_config(args.model)
        dtype = resolve_dtype(args.dtype, self.model_config.torch_dtype, device)
        self.model_config.model = str(args.model)
        self.model_config.max_model_len = max_model_len = _max_model_len(
            self.model_config, args.max_model_len
        )
        self.tokenizer = _load_tokenizer(args.tokenizer or args.model)
        self.tp_driver: TPDriver | None = None
        tp = None
        if args.tensor_parallel_size > 1:
            tp = self._start_workers(device, dtype)
        try:
            self.runner = ModelRunner(
                args.model,
                self.model_config,
                device=device,
                dtype=dtype,
                max_model_len=max_model_len,
                block_size=args.block_size,
                seed=args.seed,
                attention_backend=args.attention_backend,
                kv_cache_dtype=args.kv_cache_dtype,
                load_format=args.load_format,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                lora_config=args.lora_config(),
                tp=tp,
            )
            if self.tp_driver is not None:
                self.tp_driver.wait_loaded()
                self.runner.driver = self.tp_driver
            self._init_cache_and_scheduler(args, max_model_len)
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self, device: Any, dtype: Any) -> tuple[TPLayout, TPGroup]:
        """Spawns ranks 1..N-1 (each loads its own shard) once the split is known to be valid."""
        args, size = self.args, self.args.tensor_parallel_size
        check_parallel_support(
            get_model_class(self.model_config.architecture), self.model_config.architecture, self.model_config
        )
        layout = TPLayout.for_config(self.model_config, 0, size)  # refuses a model that does not split
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} GPUs, {torch.cuda.device_count()} are visible"
            )
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // size)))
        self.tp_driver = TPDriver(
            WorkerSpec(
                rank=0,
                world_size=size,
                init_method="",
                channel=args.tp_channel,
                shm_name="",
                timeout_s=args.tp_timeout_s,
                model=str(args.model),
                device=device.type,
                dtype=str(dtype).removeprefix("torch."),
                max_model_len=self.model_config.max_model_len,
                block_size=args.block_size,
                seed=args.seed,
                attention_backend=args.attention_backend,
                kv_cache_dtype=args.kv_cache_dtype,
                load_format=args.load_format,
            )
        )
        return layout, TPGroup(0, size)

    def add_fatal_callback(self, callback: Any) -> None:
        """callback(reason) runs (on a watchdog thread) when a tensor-parallel worker dies or hangs."""
        if self.tp_driver is not None:
            self.tp_driver.on_failure.append(callback)

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (nothing to do for one rank). Idempotent."""
        if self.tp_driver is not None:
            self.tp_driver.close()

    def _init_cache_and_scheduler(self, args: EngineArgs, max_model_len: int) -> None:
        num_blocks = args.num_blocks or self.runner.profile_num_blocks(
            args.gpu_memory_utilization,
            args.max_num_batched_tokens,
            max_model_len,
            args.max_num_seqs,
            args.cpu_kv_cache_gb,
        )
        # every layer slides: blocks behind the largest window are freed, so one sequence needs only that much
        kv_window = reusable_window(
            [attn.sliding_window for attn in as_causal_lm(self.runner.model).attention_layers()]
        )
        chunk = args.max_num_batched_tokens
        if args.long_prefill_token_threshold > 0:
            chunk = min(chunk, args.long_prefill_token_threshold)
        blocks_per_seq = max_blocks_per_seq(max_model_len, args.block_size, kv_window, chunk)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {args.block_size} tokens, fewer than"
                f" max_model_len={max_model_len} needs ({blocks_per_seq} blocks for one sequence"
                f"{'' if kv_window is None else f' with sliding window {kv_window}'}); raise num_blocks /"
                " gpu_memory_utilization or lower max_model_len"
            )
        self.runner.allocate_kv_cache(num_blocks)
        self.cuda_graph_seconds = 0.0  # capture time; 0: eager (CPU, torch backend or enforce_eager)
        self.embed = args.task == "embed"
        if not args.enforce_eager and self.runner.supports_cuda_graphs and not self.embed:  # graphs decode
            self.cuda_graph_seconds = self.runner.prepare_decode_graphs(args.max_num_seqs)
        if self.embed:
            self.runner.pooler = Pooler(args.pooler_config or PoolerConfig())
        # embed: no prefix cache, every prompt token's hidden state is computed (MEAN pools them all)
        self.block_manager = BlockManager(
            num_blocks,
            args.block_size,
            args.enable_prefix_caching and not self.embed,
            kv_window,
            block_salt=rope_block_salt(self.runner.model),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                args.max_num_seqs,
                args.max_num_batched_tokens,
                max_model_len,
                args.long_prefill_token_threshold,
                args.max_loras if args.enable_lora else 0,
            ),
            self.block_manager,
        )
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner.eos_token_ids = sorted(self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # abort outputs, delivered by the next step()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (prompt logprobs)
        async_scheduling = args.async_scheduling
        if async_scheduling is None:
            # tensor parallel: off, the workers' input ids would hold the placeholders that async
            # scheduling fills on rank 0's device only (EngineArgs refuses async_scheduling=True there)
            async_scheduling = (
                self.runner.device.type == "cuda" and not self.embed and args.tensor_parallel_size == 1
            )
        self.async_scheduling = async_scheduling
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None  # async: the launched step
        self._sync_only: set[str] = set()  # request ids whose steps must run synchronously
        self.lora = self.runner.lora  # LoRAManager (None: LoRA off)
        # per adapter name: requests admitted, prompt tokens, generated tokens (vLLM's per-adapter metrics)
        self.lora_requests: dict[str, int] = {}
        self.lora_prompt_tokens: dict[str, int] = {}
        self.lora_generation_tokens: dict[str, int] = {}
        if self.lora is not None:
            self.lora.pinned = self.scheduler.running_adapters
            for name, path in (args.lora_modules or {}).items():
                self.lora.add(name, path)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # --- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queues a request. `prompt` is text (tokenized with the tokenizer's special tokens) or token
        ids; pass both text and `prompt_token_ids` to keep the text (e.g. a rendered chat) while
        skipping tokenization. `lora_request` runs it with that adapter (registered first when
        it names an unknown adapter with a path). Raises ValueError on an invalid prompt or parameters."""
        params = params or SamplingParams()
        lora_id = self._lora_id(lora_request)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is not None:
            token_ids = list(prompt_token_ids)
        else:
            token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params)
        if self.embed:
            _check_embed_params(params)
        req = Request(request_id, text, token_ids, params, arrival_time=arrival_time or time.monotonic())
        if params.structured_outputs is not None:  # before queuing: an invalid grammar queues nothing
            self._add_grammars(req, params.structured_outputs)
        for seq in req.seqs:
            seq.lora_id = lora_id
            seq.detokenizer = (
                IncrementalDetokenizer(self.tokenizer, token_ids, params.stop, params.skip_special_tokens)
                if params.detokenize
                else NullDetokenizer()
            )
            self.scheduler.add_seq(seq)
        self.requests[request_id] = req
        p = params
        if (
            p.structured_outputs is not None
            or p.repetition_penalty != 1.0
            or p.presence_penalty
            or p.frequency_penalty
        ):
            self._sync_only.add(request_id)
        if lora_id and self.lora is not None:
            name = self.lora.name_of(lora_id)
            self.lora_requests[name] = self.lora_requests.get(name, 0) + 1

    # --- LoRA adapters ----------------------------------------------------------------------------
    def _lora_id(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return 0
        if self.lora is None:
            raise ValueError("a LoRA adapter was requested but the engine runs without enable_lora")
        lora_id = self.lora.id_of(lora_request.lora_name)
        if lora_id is None:
            if lora_request.lora_path is None:
                raise ValueError(f"the LoRA adapter {lora_request.lora_name!r} is not loaded")
            lora_id = self.lora.add(lora_request.lora_name, lora_request.lora_path)
        return lora_id

    def add_lora(self, lora_request: LoRARequest) -> int:
        """Loads an adapter (between steps); AdapterError (ValueError) naming the file when it is bad."""
        if self.lora is None:
            raise ValueError("the engine runs without enable_lora")
        if lora_request.lora_path is None:
            raise ValueError("add_lora needs lora_request.lora_path")
        return self.lora.add(lora_request.lora_name, lora_request.lora_path)

    def remove_lora(self, name: str) -> bool:
        """Unloads an adapter: new requests cannot pick it; running ones finish with it."""
        return self.lora is not None and self.lora.remove(name)

    def list_loras(self) -> list[str]:
        return [] if self.lora is None else self.lora.names()

    def _add_grammars(self, req: Request, structured_outputs: Any) -> None:
        """One grammar state per sequence of `req`; none is left behind when one fails to compile."""
        guided = self._guided_decoder()
        try:
            for seq in req.seqs:
                guided.add(seq.seq_id, structured_outputs)
        except ValueError:
            for seq in req.seqs:
                guided.release(seq.seq_id)
            raise

    def _guided_decoder(self) -> GuidedDecoder:
        if self.runner.guided is None:
            self.runner.guided = GuidedDecoder(
                self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids)
            )
        return self.runner.guided

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len, vocab = self.model_config.max_model_len, self.model_config.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) > max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_model_len={max_len}")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, k in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and k > self.args.max_logprobs:
                raise ValueError(f"{name}={k} exceeds max_logprobs={self.args.max_logprobs}")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stops the request(s) now and frees their KV blocks; unknown ids are ignored. The final
        output (finish_reason "abort") comes out of the next step()."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self._finish(seq, FinishReason.ABORT)
            req.finish_time = time.monotonic()
            self._pending.append(self._make_output(req))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.async_scheduling and not (self._sync_only & self.requests.keys()):
            return self._step_async()
        outputs = self._finish_inflight()  # leaving async mode: the launched step first
        outputs, self._pending = self._pending + outputs, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        result = self._execute(sched)
        self.scheduler.update_from_output(sched, result.sampled)
        return outputs + self._process_result(sched, result, None)

    def _step_async(self) -> list[RequestOutput]:
        """Launch step n, then finish step n-1 while n runs (module docstring)."""
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty:
            prev = self._inflight[1] if self._inflight is not None else None
            launched = (sched, self.runner.launch(sched, prev))
            self.scheduler.on_launch(sched)
        outputs += self._finish_inflight()
        self._inflight = launched
        return outputs

    def _finish_inflight(self) -> list[RequestOutput]:
        if self._inflight is None:
            return []
        sched, handle = self._inflight
        self._inflight = None
        result = handle.result()
        return self._process_result(sched, result, self.scheduler.on_tokens(sched, result.sampled))

    def _process_result(
        self,
        sched: SchedulerOutput,
        result: ModelRunnerOutput,
        filled: list[tuple[Sequence, int]] | None,
    ) -> list[RequestOutput]:
        """Stop checks, detokenization and outputs of a finished step. filled: (sequence, token count up
        to its new token) from async placeholders; None: synchronous, each sequence's last token."""
        outputs: list[RequestOutput] = []
        if filled is None:
            filled = [(s.seq, s.seq.num_tokens) for s in sched.scheduled if s.seq.seq_id in result.sampled]
        if result.prompt_logprobs:
            self._append_prompt_logprobs(sched, result.prompt_logprobs)
        touched: dict[str, Request] = {}
        now = time.monotonic()
        if result.embeddings:
            self._finish_pooled(sched, result, touched)
        for seq, num_tokens in filled:
            if seq.is_finished:  # aborted while its step ran
                continue
            lp = result.logprobs.get(seq.seq_id)
            if lp is not None:
                seq.output_logprobs.append(lp)
                seq.cumulative_logprob += result.sampled_logprob[seq.seq_id]
            self._process_token(seq, num_tokens)
            touched[seq.request_id] = self.requests[seq.request_id]
            self.generation_tokens_total += 1
            if seq.lora_id and self.lora is not None:
                self._count_lora_token(seq, num_tokens)
        for req in touched.values():
            output = self._request_output(req, now)
            if output is not None:
                outputs.append(output)
        return outputs

    def _finish_pooled(
        self, sched: SchedulerOutput, result: ModelRunnerOutput, touched: dict[str, Request]
    ) -> None:
        """task "embed": a pooled prompt is a finished request."""
        for s in sched.scheduled:
            embedding = result.embeddings.get(s.seq.seq_id)
            if embedding is not None:
                req = touched[s.seq.request_id] = self.requests[s.seq.request_id]
                req.embedding = embedding
                self._finish(s.seq, FinishReason.STOP)

    def _request_output(self, req: Request, now: float) -> RequestOutput | None:
        """Timing and metrics of a request this step touched; its output unless it streams only the final one."""
        if req.first_token_time is None:
            req.first_token_time = now
            self.prompt_tokens_total += len(req.prompt_token_ids)
        finished = req.finished
        if finished:
            req.finish_time = now
            del self.requests[req.request_id]
            self._sync_only.discard(req.request_id)
        if finished or req.params.output_kind != "final_only":
            return self._make_output(req)
        return None

    def _count_lora_token(self, seq: Sequence, num_tokens: int) -> None:
        """Per-adapter metrics of one generated token (num_tokens: the sequence's length with it)."""
        assert self.lora is not None
        name = self.lora.name_of(seq.lora_id)
        self.lora_generation_tokens[name] = self.lora_generation_tokens.get(name, 0) + 1
        if num_tokens - seq.num_prompt_tokens == 1 and seq.index == 0:  # its request's first token
            self.lora_prompt_tokens[name] = self.lora_prompt_tokens.get(name, 0) + seq.num_prompt_tokens

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        driver = self.tp_driver
        if driver is None:
            return self.runner.execute(sched)
        driver.check()
        try:
            return self.runner.execute(sched)
        except Exception as exc:
            if isinstance(exc, WorkerFailedError):
                raise
            time.sleep(0.3)  # a collective failed: let the watchdog name the worker that exited
            driver.check()
            raise
        finally:
            driver.step_done()

    def _process_token(self, seq: Sequence, num_tokens: int) -> None:
        """seq's token number num_tokens arrived (later ones may still be placeholders)."""
        reason = self.scheduler.check_stop(seq, self.eos_token_ids, num_tokens)
        detok: IncrementalDetokenizer | NullDetokenizer = seq.detokenizer
        if reason is not FinishReason.STOP:  # an EOS / stop token id is not part of the text
            stop_str = detok.update(seq.token_ids[num_tokens - 1])
            if stop_str is not None:
                reason, seq.stop_reason = FinishReason.STOP, stop_str
        if reason is not None and not isinstance(seq.stop_reason, str):  # ended, not cut: emit pending bytes
            stop_str = detok.flush()
            if stop_str is not None:
                reason, seq.stop_reason = FinishReason.STOP, stop_str
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq.seq_id)

    def _append_prompt_logprobs(
        self, sched: SchedulerOutput, new: dict[int, list[dict[int, Logprob]]]
    ) -> None:
        for s in sched.scheduled:
            entries = new.get(s.seq.seq_id)
            if entries:
                if s.seq.params.detokenize:
                    self._decode_logprob_tokens(entries)
                s.seq.prompt_logprobs += entries

    def _decode_logprob_tokens(self, entries: list[dict[int, Logprob]]) -> None:
        """Fills each Logprob's decoded_token: the token's text alone (cached per id)."""
        for entry in entries:
            for token_id, lp in entry.items():
                text = self._token_texts.get(token_id)
                if text is None:
                    text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
                lp.decoded_token = text

    def _make_output(self, req: Request) -> RequestOutput:
        completions = []
        for seq in req.seqs:
            want_lp = seq.params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.detokenizer.output_text(seq.is_finished),
                    token_ids=seq.output_token_ids,  # a copy (the client may keep it), placeholders excluded
                    cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                    logprobs=list(seq.output_logprobs) if want_lp else None,
                    finish_reason=str(seq.finish_reason) if seq.finish_reason else None,
                    stop_reason=seq.stop_reason,
                )
            )
        metrics = {"arrival_time": req.arrival_time}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        if req.finish_time is not None:
            metrics["finish_time"] = req.finish_time
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:  # sample 0 computed them (see Sequence)
            prompt_logprobs = [None, *req.seqs[0].prompt_logprobs]
        return RequestOutput(
            req.request_id,
            req.prompt,
            list(req.prompt_token_ids),
            completions,
            finished=req.finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            metrics=metrics,
            prompt_logprobs=prompt_logprobs,
            embedding=req.embedding,
        )

    # --- introspection --------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        running = {seq.request_id for seq in self.scheduler.running}
        waiting = {seq.request_id for seq in self.scheduler.waiting} - running
        bm = self.block_manager
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            **self._lora_stats(),
        )

    def _lora_stats(self) -> dict[str, Any]:
        if self.lora is None:
            return {}
        lora = self.lora

        def names(seqs: Iterable[Sequence]) -> tuple[str, ...]:
            return tuple(sorted({lora.name_of(s.lora_id) for s in seqs if s.lora_id}))

        return {
            "max_lora": lora.config.max_loras,
            "running_lora_adapters": names(self.scheduler.running),
            "waiting_lora_adapters": names(self.scheduler.waiting),
            "lora_requests_total": dict(self.lora_requests),
            "lora_prompt_tokens_total": dict(self.lora_prompt_tokens),
            "lora_generation_tokens_total": dict(self.lora_generation_tokens),
        }

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()


def _max_model_len(cfg: ModelConfig, requested: int | None) -> int:
    """The model's positions; a sliding window does not limit the context (the kernels apply it per layer)."""
    limit = cfg.max_position_embeddings
    scaling = cfg.rope_scaling or {}
    if requested is not None and scaling.get("rope_type") == "dynamic":
        # dynamic NTK exists to stretch past max_position_embeddings: up to factor times it, on request
        limit = int(limit * scaling["factor"])
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens")
    return requested


def _load_tokenizer(path: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _check_embed_params(params: SamplingParams) -> None:
    """task 'embed' pools the prompt and samples nothing: the sampling-only options are refused by name."""
    if (
        params.n != 1
        or params.logprobs is not None
        or params.prompt_logprobs is not None
        or params.structured_outputs is not None
    ):
        raise ValueError(
            "task 'embed' pools the prompt: n, logprobs, prompt_logprobs and structured outputs do not apply"
        )
