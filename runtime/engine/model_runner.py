"""Owns the model, the paged KV cache and the sampler; turns a SchedulerOutput into sampled tokens.

One step = one forward over the flattened batch: every scheduled sequence contributes its new
tokens (a prefill chunk or one decode token). Logits are computed only for sequences whose step
reaches their last token (`ScheduledSeq.samples`), plus, for prompt_logprobs requests, the prompt
positions they still owe (prompt_logprobs.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
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
class ModelRunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> new token id
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)  # seq_id -> {token id: logprob}
    sampled_logprob: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] = field(
        default_factory=dict
    )  # seq_id -> new entries
    embeddings: dict[int, list[float]] = field(default_factory=dict)  # task "embed": seq_id -> pooled prompt


@dataclass(slots=True)
class StepInput:
    """One step's model inputs: what rank 0 sends every tensor-parallel worker (one message), and all
    a rank needs to run the forward. T = tokens, B = sequences; numpy int64 so that it pickles small."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    prompt_lens: np.ndarray  # [T] the prompt length of each token's sequence (length-dependent RoPE)
    slots: np.ndarray  # [T] KV cache slot of each new token
    block_tables: list[list[int]]  # [B] the block ids of each sequence
    query_lens: list[int]  # [B]
    seq_lens: list[int]  # [B]
    # the row sets the LM head runs on, in call order (prompt logprobs chunks, then the sampled rows);
    # under tensor parallelism each call is a collective (the vocab gather), so every rank makes the same
    logit_calls: list[list[int]] = field(default_factory=list)
    graph: bool = False  # a decode step through the CUDA graphs (rank 0 decides; every rank follows)


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

    def _graph_step(self, query_lens: list[int]) -> bool:
        return (
            self.decode_graphs is not None
            and len(query_lens) <= self.decode_graphs.max_batch
            and all(n == 1 for n in query_lens)
        )

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        prompt_lens: list[int] = []  # per token: its sequence's prompt length (length-dependent RoPE)
        slots: list[int] = []
        tables, query_lens, seq_lens = [], [], []
        logit_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_lp = PromptLogprobsBatch()
        pool_chunks: list[PoolChunk] = []
        token_loras: list[int] = []  # per token: its sequence's LoRA adapter id (0: base)
        for s in sched.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            if self.pooler is not None:
                pool_chunks.append(PoolChunk(seq, len(input_ids), start, s.num_new_tokens, s.samples))
            if seq.params.prompt_logprobs is not None:  # the only cost to requests that did not ask
                prompt_lp.add(seq, start, end, len(input_ids))
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            prompt_lens += [seq.num_prompt_tokens] * s.num_new_tokens
            token_loras += [seq.lora_id] * s.num_new_tokens
            slots += [s.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            tables.append(s.block_ids)
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                logit_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        step = StepInput(
            np.asarray(input_ids, dtype=np.int64),
            np.asarray(positions, dtype=np.int64),
            np.asarray(prompt_lens, dtype=np.int64),
            np.asarray(slots, dtype=np.int64),
            tables,
            query_lens,
            seq_lens,
        )
        lora_rows = self.lora is not None and self.lora.set_batch(token_loras)
        # graphs hold the base model's forward only
        step.graph = graph = not lora_rows and self._graph_step(query_lens)
        if not graph and self.pooler is None:  # the LM head calls below, in their order
            step.logit_calls = prompt_lp.row_chunks() + ([logit_rows] if sample_seqs else [])
        self._broadcast("forward_step", step)
        out = ModelRunnerOutput()
        hidden, graph_logits = self.forward_step(step, run_logit_calls=False)
        if graph_logits is not None:

            def row_logits(rows: list[int]) -> torch.Tensor:  # rows are sorted: all B of them or a subset
                if len(rows) == len(query_lens):
                    return graph_logits
                return graph_logits[torch.tensor(rows, device=self.device)]  # e.g. a 1-token prefill chunk
        else:
            assert hidden is not None  # no graph: the forward returned the hidden states
            if self.pooler is not None:  # embeddings: prefill only, nothing sampled
                out.embeddings = self.pooler(hidden, pool_chunks)
                return out
            calls = iter(step.logit_calls)

            def row_logits(rows: list[int]) -> torch.Tensor:
                # every rank makes the same LM head calls (the vocab gather is a collective)
                assert rows == next(calls), "LM head calls out of step with StepInput.logit_calls"
                return self.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [N, V]

        # The forward is queued on the device: grammar masks are computed on the CPU meanwhile.
        sampling = self._sampling_metadata(sample_seqs)
        guided = self.guided
        if guided is not None and guided.matchers:
            sampling.guided_rows = [row for row, seq in enumerate(sample_seqs) if guided.has(seq.seq_id)]
            if sampling.guided_rows:
                sampling.token_bitmask = guided.fill_bitmask(
                    [sample_seqs[r].seq_id for r in sampling.guided_rows]
                )
        if prompt_lp.rows:
            out.prompt_logprobs = prompt_lp.compute(row_logits)
        if not sample_seqs:
            return out
        result = self.sampler(row_logits(logit_rows), sampling)
        if guided is not None:
            for row in sampling.guided_rows:
                guided.accept(sample_seqs[row].seq_id, result.token_ids[row])
        for row, seq in enumerate(sample_seqs):
            out.sampled[seq.seq_id] = result.token_ids[row]
            row_logprobs, sampled_logprob = result.logprobs[row], result.sampled_logprobs[row]
            if row_logprobs is not None and sampled_logprob is not None:  # the sampler sets both or neither
                out.logprobs[seq.seq_id] = row_logprobs
                out.sampled_logprob[seq.seq_id] = sampled_logprob
        return out

    @torch.inference_mode()
    def forward_step(
        self, step: StepInput, run_logit_calls: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The forward of one step on this rank: (hidden [T, hidden], None), or (None, logits [B, V])
        for a decode step through the CUDA graphs. run_logit_calls: also run the step's LM head calls
        (a tensor-parallel worker, whose logits rank 0 gathers; rank 0 runs them while sampling)."""
        if step.graph:
            assert self.decode_graphs is not None  # _graph_step: only with captured graphs
            logits = self.decode_graphs.run(
                step.input_ids.tolist(),
                step.positions.tolist(),
                step.slots.tolist(),
                step.block_tables,
                step.seq_lens,
                step.prompt_lens.tolist(),
            )  # [B, V]
            return None, logits
        meta = self.backend.build_metadata(
            CommonAttentionMetadata(
                slot_mapping=torch.from_numpy(step.slots).to(self.device),
                block_tables=_padded_tables(step.block_tables, self.device),
                query_lens=step.query_lens,
                seq_lens=step.seq_lens,
                block_size=self.block_size,
                prompt_lens=torch.from_numpy(step.prompt_lens).to(self.device),
            )
        )
        hidden = self.model(
            torch.from_numpy(step.input_ids).to(self.device),
            torch.from_numpy(step.positions).to(self.device),
            meta,
        )  # [T, hidden]
        if run_logit_calls:
            for rows in step.logit_calls:
                self.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return hidden, None

    def _sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        params = [seq.params for seq in seqs]
        penalties = any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        )
        generators = {}
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.seq_id not in self.generators:
                    gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
                    self.generators[seq.seq_id] = gen
                generators[row] = self.generators[seq.seq_id]
        banned = []
        for seq in seqs:
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned.append(list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids))
            else:
                banned.append([])
        return SamplingMetadata(
            params=params,
            prompt_token_ids=[seq.prompt_token_ids for seq in seqs] if penalties else [],
            output_token_ids=[seq.output_token_ids for seq in seqs] if penalties else [],
            generators=generators,
            stop_ids_before_min_tokens=banned,
        )

    def release(self, seq_id: int) -> None:
        """A sequence finished: drop its generator and grammar matcher."""
        self.generators.pop(seq_id, None)
        if self.guided is not None:
            self.guided.release(seq_id)
        if self.pooler is not None:
            self.pooler.release(seq_id)


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, max_blocks] int64, right-padded with 0 (never read past a sequence's length)."""
    padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = table
    return torch.from_numpy(padded).to(device)
