"""CUDA graphs for decode steps.

At small batch a decode step is launch-bound: every layer issues about ten kernels (norms, GEMMs,
RoPE, KV write, attention, activation) and the CPU cannot queue them as fast as the GPU runs them.
Replaying a captured graph issues the whole forward as one launch.

One graph per batch size in `capture_sizes(max_num_seqs)`, captured once after the KV cache is
allocated, largest first, all in one memory pool (they never run at the same time). A step with n
decoding sequences replays the smallest captured size >= n: rows n.. are padding with slot -1 (the
KV write skips them) and seq_len 1 (attention reads one cached position; the output row is dropped).
Prefill and mixed steps, and batches above the largest size, run eagerly. The graph ends with the
LM head (logits for every row); sampling stays outside: it depends on per-request settings.

The graphs read static input buffers, so a step copies its inputs into them first. With
`capture=False` the same padded, static-buffer forward runs eagerly: that is how CPU tests check
the padding logic in the Triton interpreter.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lmforge.runtime.engine.attention import KernelAttentionMetadata
from lmforge.runtime.models.registry import as_causal_lm

if TYPE_CHECKING:
    from lmforge.runtime.engine.step_inputs import StepInputs

_NUM_FIELDS = 5  # input_ids, positions, slot_mapping, seq_lens, prompt_lens: one row each in the input buffer


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs, and max_num_seqs itself (vLLM's
    scheme: fine steps where padding would double the work, coarse ones where it costs little)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def padded_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding num_seqs rows (sizes ascending); None: run eagerly."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphRunner:
    """Static inputs + one captured decode forward (through the LM head) per batch size.

    The step inputs (token ids, positions, KV slots, context lengths, block tables) live in one
    int32 device buffer mirrored by one pinned host buffer: a step fills the host side with numpy
    and moves it with a single asynchronous copy instead of five tensor constructions and copies.
    The host buffer may be rewritten only after the previous step's copy finished; the engine
    guarantees that because every step ends by reading the sampled tokens back (a sync).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        compute_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        # hidden [B, hidden] -> logits [B, vocab]; the model runner's (tensor parallel: with the vocab gather)
        self.compute_logits = compute_logits or as_causal_lm(model).compute_logits
        self.sizes = capture_sizes(max_num_seqs)
        self.rows = rows = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        numel = rows * (_NUM_FIELDS + max_blocks_per_seq)
        self.host = torch.zeros(numel, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(numel, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.prompt_lens = self.dev[
            : _NUM_FIELDS * rows
        ].view(_NUM_FIELDS, rows)
        self.block_tables = self.dev[_NUM_FIELDS * rows :].view(rows, max_blocks_per_seq)
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.host.copy_(self.dev.cpu())
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one token per row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the graph's logits [size, vocab]

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta = KernelAttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            max_q_len=1,
            decode_only=True,
            prompt_lens=self.prompt_lens[:size],
        )
        hidden = self.model(self.input_ids[:size], self.positions[:size], meta)
        return self.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles outside the capture), then capture every size, largest first so
        the shared pool is sized by the first graph."""
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run_step(
        self, step: StepInputs, fill: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`run` from a decode step's StepInputs (its host arrays: no per-token Python lists). fill: (rows,
        token ids) on the device written over the copied input ids (async scheduling: last step's tokens)."""
        tokens, tables = step.host["tokens"], step.host["tables"]
        return self.run(tokens[0], tokens[1], tokens[2], tables, step.host["seq_lens"], tokens[3], fill)

    def run(
        self,
        input_ids: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        slot_mapping: Sequence[int] | np.ndarray,
        block_tables: Sequence[Sequence[int]] | np.ndarray,
        seq_lens: Sequence[int] | np.ndarray,
        prompt_lens: Sequence[int] | np.ndarray,
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decode step for n <= max_batch sequences (one new token each) -> logits [n, vocab]."""
        num_seqs, rows = len(input_ids), self.rows
        size = padded_size(num_seqs, self.sizes)
        if size is None:
            raise ValueError(f"{num_seqs} sequences exceed the largest captured batch {self.max_batch}")
        h = self.host_np
        h[:num_seqs] = input_ids
        h[rows : rows + num_seqs] = positions
        h[2 * rows : 2 * rows + num_seqs] = slot_mapping
        h[2 * rows + num_seqs : 2 * rows + size] = -1  # padding rows: no KV write
        h[3 * rows : 3 * rows + num_seqs] = seq_lens
        h[3 * rows + num_seqs : 3 * rows + size] = 1  # padding rows: attend to one (any) position
        h[4 * rows : 4 * rows + num_seqs] = prompt_lens  # padding rows keep earlier values (rotated, dropped)
        tables = h[_NUM_FIELDS * rows :].reshape(rows, self.max_blocks)
        if isinstance(block_tables, np.ndarray):  # [n, width] (StepInputs): one copy
            tables[:num_seqs, : block_tables.shape[1]] = block_tables
        else:
            for row, table in enumerate(block_tables):
                tables[row, : len(table)] = table
        used = _NUM_FIELDS * rows + size * self.max_blocks  # padding rows keep earlier (valid) block ids
        self.dev[:used].copy_(self.host[:used], non_blocking=True)
        if fill is not None:
            self.input_ids[fill[0]] = fill[1].to(self.input_ids.dtype)
        graph = self.graphs.get(size)
        if graph is None:  # not captured (CPU tests): the same static, padded forward, eagerly
            return self._forward(size)[:num_seqs]
        graph.replay()
        return self.outputs[size][:num_seqs]
