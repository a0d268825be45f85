"""Owns the model, the paged KV cache and the sampler; turns a SchedulerOutput into sampled tokens.

One step = one forward over the flattened batch: every scheduled sequence contributes its new
tokens (a prefill chunk or one decode token). Logits are computed only for sequences whose step
reaches their last token (`ScheduledSeq.samples`), plus, for prompt_logprobs requests, the prompt
positions they still owe (prompt_logprobs.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.runtime.engine.attention import (
    CommonAttentionMetadata,
    KernelAttentionBackend,
    get_attention_backend,
)
from lmforge.runtime.engine.config import KV_CACHE_DTYPES
from lmforge.runtime.engine.cuda_graph import DecodeGraphRunner
from lmforge.runtime.engine.guided import GuidedDecoder
from lmforge.runtime.engine.pooler import PoolChunk, Pooler
from lmforge.runtime.engine.prompt_logprobs import PromptLogprobsBatch
from lmforge.runtime.engine.sampler import Sampler, SamplingMetadata
from lmforge.runtime.engine.scheduler import SchedulerOutput
from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.engine.step_inputs import InputBuilder, StepInputs
from lmforge.runtime.lora.config import LoRAConfig
from lmforge.runtime.lora.manager import LoRAManager
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.loader import load_weights
from lmforge.runtime.models.mla import LatentAttention
from lmforge.runtime.models.parallel import (
    TPGroup,
    TPLayout,
    check_parallel_support,
    local_config,
    parallelize,
)
from lmforge.runtime.models.quant import apply_quantization
from lmforge.runtime.models.registry import as_causal_lm, get_model_class
from lmforge.runtime.outputs import Logprob

_GiB = 1 << 30


@dataclass(slots=True)
class _StepPlan:
    """A step as the host prepared it, for the device part (`ModelRunner._device_step`)."""

    step: StepInputs
    sample_seqs: list[Sequence]
    sampling: SamplingMetadata | None = None
    prompt_lp: PromptLogprobsBatch = field(default_factory=PromptLogprobsBatch)
    pool_chunks: list[PoolChunk] = field(default_factory=list)
    fill_tokens: list[int] = field(default_factory=list)  # async: input rows whose id the last step sampled
    fill_rows: list[int] = field(default_factory=list)  # ... at these rows of its token tensor


@dataclass(slots=True)
class StepHandle:
    """A launched step (async scheduling): its result, and the token-tensor row of each sampled sequence."""

    future: Future[ModelRunnerOutput]
    row_of_seq: dict[int, int]

    def result(self) -> ModelRunnerOutput:
        return self.future.result()


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> new token id
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)  # seq_id -> {token id: logprob}
    sampled_logprob: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] = field(
        default_factory=dict
    )  # seq_id -> new entries
    embeddings: dict[int, list[float]] = field(default_factory=dict)  # task "embed": seq_id -> pooled prompt
    sampled_tensor: torch.Tensor | None = None  # [N] int64 on the device, rows in sampling order


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """load_format='dummy': matrices ~ N(0, 0.02) (HF's initializer_range), vectors keep their init
    (norm weights 1): a model of the right shape whose activations stay finite, without a checkpoint."""
    for param in model.parameters():
        if param.dim() >= 2:  # drawn on the parameter's device: seconds, not minutes, for an 8B shape
            gen = torch.Generator(device=param.device).manual_seed(seed)
            param.data.normal_(0.0, 0.02, generator=gen)
            seed += 1


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        model_config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        block_size: int,
        seed: int = 0,
        attention_backend: str = "torch",
        kv_cache_dtype: str = "auto",
        load_format: str = "auto",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        tp: tuple[TPLayout, TPGroup] | None = None,
        lora_config: LoRAConfig | None = None,
    ):
        # tensor parallelism: this rank's layout and group; the model and its KV cache are the rank's shard
        self.layout: TPLayout | None = tp[0] if tp is not None else None
        self.group: TPGroup = tp[1] if tp is not None else TPGroup(0, 1)
        self.driver: Any = None  # rank 0 of a tensor-parallel engine: the channel to the workers
        self.full_vocab_size = model_config.vocab_size
        if self.layout is not None and self.layout.size > 1:
            check_parallel_support(
                get_model_class(model_config.architecture), model_config.architecture, model_config
            )
            model_config = local_config(model_config, self.layout)
        if lora_config is not None and self.layout is not None and self.layout.size > 1:
            raise ValueError(
                "LoRA adapters (enable_lora) are not supported with tensor_parallel_size > 1 yet"
            )
        self.config = model_config
        self.device, self.dtype, self.block_size = device, dtype, block_size
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of {KV_CACHE_DTYPES}")
        self.kv_cache_dtype = kv_cache_dtype
        # element type of the K/V caches; int8 adds fp32 scale caches (one scale per token and KV head)
        self.cache_dtype = torch.int8 if kv_cache_dtype == "int8" else dtype
        if model_config.mla is not None and kv_cache_dtype == "int8":  # scales per KV head: no latent cache
            raise ValueError(
                f"{model_config.architecture}: kv_cache_dtype='int8' is not supported for latent attention (MLA)"
            )
        self.backend = get_attention_backend(attention_backend, device)
        cls = get_model_class(model_config.architecture)
        with torch.device(device), _default_dtype(dtype):
            self.model = cls(model_config, max_model_len, self.backend)
            quantized = apply_quantization(self.model, model_dir)  # compressed-tensors: quantized Linears
            if self.layout is not None:
                parallelize(self.model, model_config, self.layout, self.group)
        if load_format == "dummy":
            if quantized is not None:
                raise ValueError("load_format='dummy' does not support quantized checkpoints")
            init_dummy_weights(self.model, seed + 1000 * (self.layout.rank if self.layout else 0))
        else:
            full = None if self.layout is None else (self.layout, model_config)
            load_weights(self.model, model_dir, full)
        self.model.eval().requires_grad_(False)
        self.lora: LoRAManager | None = (
            None  # when serving adapters: wraps the linears now, before KV profiling
        )
        if lora_config is not None:
            with _default_dtype(dtype):
                self.lora = LoRAManager(
                    self.model, lora_config, device=device, dtype=dtype, ops=self.backend.ops
                )
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed), self.backend.ops)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> generator of a seeded request
        self.eos_token_ids: list[int] = list(model_config.eos_token_ids)
        self.num_blocks = 0
        self.max_model_len = max_model_len
        self.decode_graphs: DecodeGraphRunner | None = None  # see prepare_decode_graphs
        self.guided: GuidedDecoder | None = None  # set by the engine on the first constrained request
        self.pooler: Pooler | None = None  # task "embed" (set by the engine): pool, never sample
        self.inputs = InputBuilder(  # persistent host buffers for the step inputs
            max_num_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=math.ceil(max_model_len / block_size),
            block_size=block_size,
            device=device,
        )
        # (sampled seq ids, metadata, rows with min_tokens) of the last batch composition
        self._sampling_cache: tuple[list[int], SamplingMetadata, list[int]] | None = None
        self._worker: Any = None  # async scheduling: the thread that runs launched steps, in order

    # --- KV cache -------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of K and V for one block across all layers (int8: the codes plus one fp32 scale per
        token and KV head)."""
        c = self.config
        latent = [a.kv_bytes_per_token(self.cache_dtype) for a in as_causal_lm(self.model).attention_layers()
                  if isinstance(a, LatentAttention)]  # fmt: skip
        if latent:  # MLA: one latent vector per token and layer, not K and V per head
            return self.block_size * sum(latent)
        per_token_head = c.head_dim * self.cache_dtype.itemsize
        if self.kv_cache_dtype == "int8":
            per_token_head += torch.float32.itemsize
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * per_token_head

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("allocate_kv_cache", num_blocks)
        self._allocate_local(num_blocks)

    def _allocate_local(self, num_blocks: int) -> None:
        """Binds k_cache/v_cache [num_blocks, block_size, Hkv, D] (int8: also k/v_scale_cache
        [num_blocks, block_size, Hkv] fp32) to every attention layer. Zeroed so that masked-out
        padding positions never carry NaNs (on CPU, calloc: pages stay lazy)."""
        c = self.config
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)  # this rank's KV heads
        int8 = self.kv_cache_dtype == "int8"
        self.decode_graphs = None  # captured graphs point at the old cache: capture again
        for attn in as_causal_lm(self.model).attention_layers():
            if isinstance(attn, LatentAttention):  # MLA: its own latent layout
                attn.bind_kv_cache(num_blocks, self.block_size, self.cache_dtype, self.device)
                continue
            attn.k_cache = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            attn.k_scale_cache = (
                torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
            )
            attn.v_scale_cache = (
                torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
            )
        self.num_blocks = num_blocks

    def profile_num_blocks(
        self,
        gpu_memory_utilization: float,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_num_seqs: int,
        cpu_kv_cache_gb: float,
    ) -> int:
        """Blocks that fit: on CUDA, what is left of `utilization` x total memory after the weights
        and the activation peak of a full-budget dummy step; on CPU, a fixed byte budget. Tensor
        parallel: every rank profiles its shard and the engine takes the minimum over ranks."""
        self._broadcast(
            "profile_num_blocks",
            gpu_memory_utilization,
            max_num_batched_tokens,
            max_model_len,
            max_num_seqs,
            cpu_kv_cache_gb,
        )
        return self._min_over_ranks(
            self._profile_num_blocks(
                gpu_memory_utilization, max_num_batched_tokens, max_model_len, max_num_seqs, cpu_kv_cache_gb
            )
        )

    def _min_over_ranks(self, value: int) -> int:
        if self.group.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _profile_num_blocks(
        self,
        gpu_memory_utilization: float,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_num_seqs: int,
        cpu_kv_cache_gb: float,
    ) -> int:
        if self.device.type != "cuda":
            return int(cpu_kv_cache_gb * _GiB // self.block_bytes)
        num_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_local(math.ceil(num_tokens / self.block_size))
        self.dummy_run(num_tokens, max_model_len, num_logits=min(max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        tmp_kv = self.num_blocks * self.block_bytes
        self._allocate_local(0)
        free, total = torch.cuda.mem_get_info(self.device)
        peak_without_kv = torch.cuda.max_memory_allocated(self.device) - tmp_kv
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        available = total * gpu_memory_utilization - peak_without_kv - max(non_torch, 0)
        torch.cuda.empty_cache()
        return max(int(available // self.block_bytes), 0)

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, max_model_len: int, num_logits: int = 1) -> None:
        """A prefill of `num_tokens` tokens split into max_model_len-long sequences (profiling)."""
        lens = [min(max_model_len, num_tokens - s) for s in range(0, num_tokens, max_model_len)]
        blocks_per_seq = math.ceil(max(lens) / self.block_size)
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(lens))]
        positions = [p for n in lens for p in range(n)]
        slots = [
            tables[i][p // self.block_size] * self.block_size + p % self.block_size
            for i, n in enumerate(lens)
            for p in range(n)
        ]
        self._allocate_local(max(self.num_blocks, len(lens) * blocks_per_seq))
        common = self._common_meta(slots, tables, lens, lens, [n for n in lens for _ in range(n)])
        hidden = self.model(
            torch.zeros(num_tokens, dtype=torch.long, device=self.device),
            torch.tensor(positions, device=self.device),
            self.backend.build_metadata(common),
        )
        self.compute_logits(hidden[:num_logits]).float().softmax(-1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab]; tensor parallel: each rank's vocab shard, gathered (a collective:
        every rank calls it with the same N)."""
        logits = as_causal_lm(self.model).compute_logits(hidden)
        if self.group.world_size == 1:
            return logits
        return self.group.all_gather_last(logits)[:, : self.full_vocab_size]

    def _broadcast(self, method: str, *args: Any) -> None:
        """Rank 0 of a tensor-parallel engine: the workers make the same call (tp_worker.serve)."""
        if self.driver is not None:
            self.driver.call(method, *args)

    def _common_meta(
        self,
        slots: list[int],
        tables: list[list[int]],
        query_lens: list[int],
        seq_lens: list[int],
        prompt_lens: list[int],
    ) -> CommonAttentionMetadata:
        padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)  # right-padded with 0
        for row, table in enumerate(tables):
            padded[row, : len(table)] = table
        return CommonAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=torch.from_numpy(padded).to(self.device),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=self.block_size,
            prompt_lens=torch.tensor(prompt_lens, dtype=torch.long, device=self.device),
        )

    # --- CUDA graphs ----------------------------------------------------------------------------
    @property
    def supports_cuda_graphs(self) -> bool:
        """Graphs need the kernel backend (its metadata lives in device tensors; the torch reference
        reads sequence lengths on the host) on a CUDA device."""
        return (  # MLA: latent attention walks the batch on the host
            self.device.type == "cuda"
            and isinstance(self.backend, KernelAttentionBackend)
            and self.config.mla is None
        )

    def prepare_decode_graphs(self, max_num_seqs: int, capture: bool = True) -> float:
        """Static decode buffers for up to max_num_seqs sequences; captures the graphs unless
        capture=False (then the same padded forward runs eagerly: tests). Call after
        allocate_kv_cache (the graphs hold the cache's addresses). Returns seconds spent."""
        if not isinstance(self.backend, KernelAttentionBackend):
            raise ValueError("decode graphs need attention_backend='triton'")
        # Tensor parallel: every rank captures the same sizes, the all-reduces and the vocab gather
        # inside the graphs (NCCL kernels are capturable). Not exercised on CPU; see README.
        self._broadcast("prepare_decode_graphs", max_num_seqs, capture)
        start = time.perf_counter()
        self.decode_graphs = DecodeGraphRunner(
            self.model,
            compute_logits=self.compute_logits,
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=math.ceil(self.max_model_len / self.block_size),
            device=self.device,
        )
        if capture:
            self.decode_graphs.capture()
        return time.perf_counter() - start

    def _graph_step(self, step: StepInputs) -> bool:
        return (
            self.decode_graphs is not None
            and step.num_seqs <= self.decode_graphs.max_batch
            and step.decode_only
        )

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One step, synchronously: inputs, forward, LM head, draw."""
        return self._device_step(self._host_step(sched), None)

    def launch(self, sched: SchedulerOutput, prev: StepHandle | None) -> StepHandle:
        """Async scheduling: the host part of the step now, the device part queued behind `prev` (one
        worker thread plays the device stream, so on CPU too the host can prepare the next step while
        this one runs). Tokens `prev` sampled for sequences this step reads are still placeholders on
        the host: the device part takes them from `prev`'s token tensor, never from the host."""
        plan = self._host_step(sched)
        if prev is not None:
            rows = prev.row_of_seq
            for i, s in enumerate(sched.scheduled):  # a placeholder can only be the row's last input token
                seq = s.seq
                if seq.num_pending and seq.num_computed_tokens + s.num_new_tokens == seq.num_tokens:
                    plan.fill_tokens.append(plan.step.host_query_start_loc[i + 1] - 1)
                    plan.fill_rows.append(rows[seq.seq_id])
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-step")
        future = self._worker.submit(self._device_step, plan, prev)
        return StepHandle(future, {seq.seq_id: row for row, seq in enumerate(plan.sample_seqs)})

    def _host_step(self, sched: SchedulerOutput) -> _StepPlan:
        """Everything that reads the sequences (main thread): inputs, sampling metadata, which rows
        score prompt logprobs or pool, and what rank 0 decides for every tensor-parallel rank (graph
        or eager, the LM head calls)."""
        for seq in sched.preempted:  # their tables are rebuilt when they are scheduled again
            self.inputs.release(seq.seq_id)
        step = self.inputs.build(sched.scheduled)
        plan = _StepPlan(step, [sched.scheduled[row].seq for row in step.sample_rows])
        offsets = step.host_query_start_loc
        for i, s in enumerate(sched.scheduled):
            seq = s.seq
            if self.pooler is not None:
                plan.pool_chunks.append(
                    PoolChunk(seq, offsets[i], seq.num_computed_tokens, s.num_new_tokens, s.samples)
                )
            if seq.params.prompt_logprobs is not None:  # the only cost to requests that did not ask
                start = seq.num_computed_tokens
                plan.prompt_lp.add(seq, start, start + s.num_new_tokens, offsets[i])
        step.graph = not step.lora_ids and self._graph_step(step)  # graphs hold the base model only
        if self.group.world_size > 1 and not step.graph and self.pooler is None:
            step.logit_calls = self._logit_calls(plan)
        if plan.sample_seqs:
            plan.sampling = self._sampling_metadata(plan.sample_seqs)
            self._set_guided_rows(plan)
        return plan

    @staticmethod
    def _logit_calls(plan: _StepPlan) -> list[list[int]]:
        """The hidden-state rows of each LM head call of the step, in order (prompt logprobs chunks, then
        the sampled rows): under tensor parallelism each is a collective every rank makes."""
        offsets = plan.step.host_query_start_loc
        sampled = [offsets[row + 1] - 1 for row in plan.step.sample_rows]
        return plan.prompt_lp.row_chunks() + ([sampled] if sampled else [])

    def _set_guided_rows(self, plan: _StepPlan) -> None:
        guided, sampling = self.guided, plan.sampling
        if guided is None or not guided.matchers or sampling is None:
            return
        sampling.guided_rows = [row for row, seq in enumerate(plan.sample_seqs) if guided.has(seq.seq_id)]
        if sampling.guided_rows:
            sampling.token_bitmask = guided.fill_bitmask(
                [plan.sample_seqs[r].seq_id for r in sampling.guided_rows]
            )

    @torch.inference_mode()
    def _device_step(self, plan: _StepPlan, prev: StepHandle | None) -> ModelRunnerOutput:
        """The forward, the LM head over the sampled rows, and the draw of one step. Tensor parallel:
        rank 0 sends the step to the workers first, from this same thread (their collectives pair up
        with the ones of this forward)."""
        step = plan.step
        fill = self._fill(plan, prev)
        if self.driver is not None:
            self._broadcast("forward_step", step.message())
        out = ModelRunnerOutput()
        hidden, graph_logits = self._forward(step, fill)
        if graph_logits is not None:

            def row_logits(rows: list[int]) -> torch.Tensor:  # rows are sorted: all B of them or a subset
                if len(rows) == step.num_seqs:
                    return graph_logits
                return graph_logits[torch.tensor(rows, device=self.device)]  # e.g. a 1-token prefill chunk

            sampled_logits = lambda: row_logits(step.sample_rows)  # noqa: E731
        else:
            assert hidden is not None  # no graph: the forward returned the hidden states
            if self.pooler is not None:  # embeddings: prefill only, nothing sampled
                out.embeddings = self.pooler(hidden, plan.pool_chunks)
                return out

            def row_logits(rows: list[int]) -> torch.Tensor:
                return self.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [N, V]

            sampled_logits = lambda: self.compute_logits(hidden[step.logits_indices])  # noqa: E731

        if plan.prompt_lp.rows:
            out.prompt_logprobs = plan.prompt_lp.compute(row_logits)
        if plan.sampling is not None:
            self._draw(plan, plan.sampling, sampled_logits(), out)
        return out

    def _fill(self, plan: _StepPlan, prev: StepHandle | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Async scheduling: (input rows, token ids) the last step sampled, device to device."""
        if not plan.fill_tokens:
            return None
        assert prev is not None
        prev_tokens = prev.future.result().sampled_tensor  # done: the worker runs steps in order
        assert prev_tokens is not None, "the previous step sampled nothing for a placeholder"
        index = torch.tensor(plan.fill_tokens, device=self.device)
        return index, prev_tokens[torch.tensor(plan.fill_rows, device=self.device)]

    def _draw(
        self, plan: _StepPlan, sampling: SamplingMetadata, logits: torch.Tensor, out: ModelRunnerOutput
    ) -> None:
        sample_seqs = plan.sample_seqs
        result = self.sampler(logits, sampling)
        guided = self.guided
        if guided is not None:
            for row in sampling.guided_rows:
                guided.accept(sample_seqs[row].seq_id, result.token_ids[row])
        out.sampled = dict(zip([seq.seq_id for seq in sample_seqs], result.token_ids, strict=True))
        out.sampled_tensor = result.token_tensor
        if sampling.any_logprobs:
            for row, seq in enumerate(sample_seqs):
                row_logprobs, sampled_logprob = result.logprobs[row], result.sampled_logprobs[row]
                if (
                    row_logprobs is not None and sampled_logprob is not None
                ):  # the sampler sets both or neither
                    out.logprobs[seq.seq_id] = row_logprobs
                    out.sampled_logprob[seq.seq_id] = sampled_logprob

    def _forward(
        self, step: StepInputs, fill: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden [T, hidden], None), or (None, logits [B, V]) for a decode step through the graphs.
        The LoRA context is set here, on the thread that runs the forward (async scheduling)."""
        if self.lora is not None:
            if step.lora_ids:
                self.lora.set_batch(step.token_lora_ids())
            else:
                self.lora.clear_batch()
        if step.graph:
            assert self.decode_graphs is not None  # _graph_step: only with captured graphs
            return None, self.decode_graphs.run_step(step, fill)  # [B, V]
        if fill is not None:
            step.input_ids[fill[0]] = fill[1]
        meta = self.backend.build_metadata(step.attention_metadata())
        return self.model(step.input_ids, step.positions, meta), None  # [T, hidden]

    @torch.inference_mode()
    def forward_step(
        self, step: StepInputs, run_logit_calls: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A tensor-parallel worker's step (rank 0's message): the forward on this rank's shard, then
        the step's LM head calls (their vocab gathers pair up with rank 0's) unless run_logit_calls is
        False. Returns what `_forward` does."""
        step = step.to(self.device)
        hidden, logits = self._forward(step, None)
        if run_logit_calls and hidden is not None:
            for rows in step.logit_calls:
                self.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return hidden, logits

    def _sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        """Cached per batch composition (the same sequences in the same rows as the last step): only the
        parts that change per token (min_tokens bans, penalty counts) are rebuilt, and only for rows that
        have them. Guided fields are set per step by the caller."""
        key = [seq.seq_id for seq in seqs]
        cached = self._sampling_cache
        if cached is None or cached[0] != key:
            params = [seq.params for seq in seqs]
            generators = {}
            for row, seq in enumerate(seqs):
                if seq.params.seed is not None and not seq.params.greedy:
                    if seq.seq_id not in self.generators:
                        gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
                        self.generators[seq.seq_id] = gen
                    generators[row] = self.generators[seq.seq_id]
            meta = SamplingMetadata(params, [], [], generators, [[] for _ in seqs])
            min_token_rows = [row for row, p in enumerate(params) if p.min_tokens > 0]
            cached = self._sampling_cache = (key, meta, min_token_rows)
        _, meta, min_token_rows = cached
        banned = list(meta.stop_ids_before_min_tokens) if min_token_rows else meta.stop_ids_before_min_tokens
        for row in min_token_rows:
            seq = seqs[row]
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned[row] = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            else:
                banned[row] = []
        if min_token_rows or meta.any_penalties or self.guided is not None:
            # a fresh object: a step in flight may still read the cached one (async scheduling)
            meta = copy.copy(meta)
            meta.stop_ids_before_min_tokens = banned
            if meta.any_penalties:
                meta.prompt_token_ids = [seq.prompt_token_ids for seq in seqs]
                meta.output_token_ids = [seq.output_token_ids for seq in seqs]
        meta.guided_rows, meta.token_bitmask = [], None
        return meta

    def release(self, seq_id: int) -> None:
        """A sequence finished: drop its generator, grammar matcher and block-table row."""
        self.generators.pop(seq_id, None)
        self.inputs.release(seq_id)
        if self.guided is not None:
            self.guided.release(seq_id)
        if self.pooler is not None:
            self.pooler.release(seq_id)
