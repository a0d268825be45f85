"""The inputs of one forward step, in one struct, and the builder that fills them from persistent buffers.

`StepInputs` is the contract between the host side of a step (scheduler output -> tensors) and the
forward: everything a model forward needs and nothing else, so it is what rank 0 sends to
tensor-parallel workers, and where per-row extras go (e.g. a LoRA adapter index per row). The fields:

    T = tokens in the step, B = sequences (rows), N = rows that sample
    input_ids, positions, slot_mapping, prompt_lens   [T] int64
    block_tables                                      [B, max_blocks] int32 (entries past a row's blocks: stale)
    seq_lens                                          [B] int32 context after the step
    query_start_loc                                   [B+1] int32 cumulative new tokens
    logits_indices                                    [N] int64 rows of the hidden states to sample from
    plus host mirrors (query_lens, seq_lens_host, seq_ids, sample_rows) that the host side reads,
    lora_ids ([B] each row's adapter id, 0: base), and what rank 0 decides for every tensor-parallel rank:
    logit_calls (the row sets the LM head runs on, in call order: each call is a collective, the vocab
    gather) and graph (a decode step through the CUDA graphs).

`InputBuilder` writes them without per-token Python objects: one pass over the scheduled sequences
collects a handful of ints per row into preallocated numpy arrays, numpy derives positions, slots and
per-token prompt lengths, and the block table of each sequence lives in a persistent row that only
ever receives the block ids added since the last step (`block_ids` grows at the end; entries a sliding
window released stay stale, and no kernel reads before the window). The step's table is one gather of
those rows. Two buffer sets alternate, so the host may prepare step n+1 while step n still reads its
inputs (async scheduling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.runtime.engine.attention import CommonAttentionMetadata
from lmforge.runtime.engine.scheduler import ScheduledSeq


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    prompt_lens: torch.Tensor  # [T] int64: each token's sequence's prompt length (length-dependent RoPE)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    logits_indices: torch.Tensor  # [N] int64
    query_lens: list[int]  # [B] host
    seq_lens_host: list[int]  # [B] host
    seq_ids: list[int]  # [B] the sequence of each row
    sample_rows: list[int]  # [N] batch rows that sample, ascending
    block_size: int
    host_query_start_loc: list[int]  # [B + 1] host
    # numpy views of the host side of the token fields (the CUDA-graph runner copies from them)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    lora_ids: list[int] = field(default_factory=list)  # [B] adapter id per row (0: base); empty: all base
    logit_calls: list[list[int]] = field(default_factory=list)  # tensor parallel: LM head rows, in order
    graph: bool = False  # a decode step through the CUDA graphs (rank 0 decides; every rank follows)

    def token_lora_ids(self) -> list[int]:
        """[T] each token's adapter id (LoRAManager.set_batch)."""
        if not self.lora_ids:
            return [0] * self.num_tokens
        return np.repeat(np.asarray(self.lora_ids), self.query_lens).tolist()

    def message(self) -> StepInputs:
        """A compact copy on the CPU that owns its memory (tensor-parallel workers get it pickled: a view
        would pickle the whole persistent buffer)."""
        host = {k: np.array(v) for k, v in self.host.items()}
        moved = {f: getattr(self, f).detach().cpu().clone() for f in _TENSOR_FIELDS}
        return dataclasses.replace(self, **moved, host=host)

    def to(self, device: torch.device) -> StepInputs:
        """The same step with its tensors on `device` (a worker rank's)."""
        if self.input_ids.device == device:
            return self
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in _TENSOR_FIELDS})

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs

    def attention_metadata(self) -> CommonAttentionMetadata:
        return CommonAttentionMetadata(
            slot_mapping=self.slot_mapping,
            block_tables=self.block_tables,
            query_lens=self.query_lens,
            seq_lens=self.seq_lens_host,
            block_size=self.block_size,
            prompt_lens=self.prompt_lens,
            seq_lens_tensor=self.seq_lens,
            query_start_loc=self.query_start_loc,
        )


_TENSOR_FIELDS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "prompt_lens",
    "block_tables",
    "seq_lens",
    "query_start_loc",
    "logits_indices",
)


def step_inputs_from_lists(
    input_ids: list[int],
    positions: list[int],
    prompt_lens: list[int],
    slot_mapping: list[int],
    block_tables: list[list[int]],
    query_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int,
    logit_calls: list[list[int]] | None = None,
) -> StepInputs:
    """A StepInputs from plain lists (tests and benches that build a step by hand; every row samples)."""
    tables = np.zeros((len(block_tables), max(1, max(map(len, block_tables)))), dtype=np.int32)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    tokens = np.asarray([input_ids, positions, slot_mapping, prompt_lens], dtype=np.int64)
    seq_lens_np = np.asarray(seq_lens, dtype=np.int32)
    return StepInputs(
        input_ids=torch.from_numpy(tokens[0]),
        positions=torch.from_numpy(tokens[1]),
        slot_mapping=torch.from_numpy(tokens[2]),
        prompt_lens=torch.from_numpy(tokens[3]),
        block_tables=torch.from_numpy(tables),
        seq_lens=torch.from_numpy(seq_lens_np),
        query_start_loc=torch.from_numpy(qsl),
        logits_indices=torch.from_numpy(qsl[1:].astype(np.int64) - 1),
        query_lens=list(query_lens),
        seq_lens_host=list(seq_lens),
        seq_ids=list(range(len(query_lens))),
        sample_rows=list(range(len(query_lens))),
        block_size=block_size,
        host_query_start_loc=qsl.tolist(),
        host={"tokens": tokens, "tables": tables, "seq_lens": seq_lens_np},
        logit_calls=logit_calls or [],
    )


class _HostBuffers:
    """One set of preallocated host arrays (pinned on CUDA, so the copies to the device are async)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool):
        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
            t = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return t, t.numpy()

        self.tokens_t, self.tokens = alloc((4, max_tokens), torch.int64)  # ids, positions, slots, prompt lens
        self.tables_t, self.tables = alloc((max_seqs, max_blocks), torch.int32)
        self.rows_t, self.rows = alloc((2, max_seqs + 1), torch.int32)  # seq_lens, query_start_loc
        self.logits_t, self.logits = alloc((max_seqs,), torch.int64)


class InputBuilder:
    def __init__(
        self,
        *,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ):
        self.block_size, self.device = block_size, device
        self.max_blocks = max_blocks_per_seq
        pin = device.type == "cuda"
        self._buffers = [
            _HostBuffers(max_num_tokens, max_num_seqs, max_blocks_per_seq, pin) for _ in range(2)
        ]
        self._next = 0
        # persistent block-table rows: seq_id -> row of `_store`, and how many entries it holds
        self._store = np.zeros((max_num_seqs + 1, max_blocks_per_seq), dtype=np.int32)
        self._row_of: dict[int, int] = {}
        self._num_stored: list[int] = [0] * (max_num_seqs + 1)
        self._free_rows = list(range(max_num_seqs, -1, -1))
        self._max_tokens, self._max_seqs = max_num_tokens, max_num_seqs

    def release(self, seq_id: int) -> None:
        """The sequence finished or was preempted: its table row goes back to the free list."""
        row = self._row_of.pop(seq_id, None)
        if row is not None:
            self._num_stored[row] = 0
            self._free_rows.append(row)

    def _store_row(self, s: ScheduledSeq) -> int:
        seq_id, block_ids = s.seq.seq_id, s.block_ids
        row = self._row_of.get(seq_id)
        if row is None:
            row = self._row_of[seq_id] = self._free_rows.pop()
        have, n = self._num_stored[row], len(block_ids)
        if n != have:
            if n < have:  # the table was rebuilt (preempted and rescheduled): take it whole
                have = 0
            self._store[row, have:n] = block_ids[have:]
            self._num_stored[row] = n
        return row

    def build(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        buf = self._buffers[self._next]
        self._next ^= 1
        num_seqs = len(scheduled)
        if num_seqs > self._max_seqs:
            raise ValueError(f"{num_seqs} sequences in one step exceed max_num_seqs={self._max_seqs}")
        rows = np.empty(num_seqs, dtype=np.int64)
        starts = np.empty(num_seqs, dtype=np.int64)
        qlens = np.empty(num_seqs, dtype=np.int64)
        plens = np.empty(num_seqs, dtype=np.int64)
        ids: list[int] = []
        seq_ids: list[int] = []
        query_lens: list[int] = []
        sample_rows: list[int] = []
        lora_ids: list[int] = []
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            rows[i], starts[i], qlens[i], plens[i] = self._store_row(s), start, n, seq.num_prompt_tokens
            if n == 1:
                ids.append(seq.token_ids[start])
            else:
                ids.extend(seq.token_ids[start : start + n])
            seq_ids.append(seq.seq_id)
            query_lens.append(n)
            lora_ids.append(seq.lora_id)
            if start + n == len(seq.token_ids):
                sample_rows.append(i)
        num_tokens = len(ids)
        if num_tokens > self._max_tokens:
            raise ValueError(
                f"{num_tokens} tokens in one step exceed max_num_batched_tokens={self._max_tokens}"
            )
        bs = self.block_size
        tok = buf.tokens[:, :num_tokens]
        tok[0] = ids
        qsl = buf.rows[1, : num_seqs + 1]
        qsl[0] = 0
        np.cumsum(qlens, out=qsl[1:])
        if num_tokens == num_seqs:  # decode only: one token per row
            token_row = np.arange(num_seqs)
            tok[1] = starts
        else:
            token_row = np.repeat(np.arange(num_seqs), qlens)
            tok[1] = starts[token_row] + (np.arange(num_tokens) - qsl[token_row])
        positions = tok[1]
        blocks = self._store[rows[token_row], positions // bs]
        tok[2] = blocks.astype(np.int64) * bs + positions % bs
        tok[3] = plens[token_row]
        seq_lens = buf.rows[0, :num_seqs]
        np.add(starts, qlens, out=seq_lens, casting="unsafe")
        width = max(1, int((seq_lens.max() + bs - 1) // bs)) if num_seqs else 1
        tables = buf.tables[:num_seqs, :width]
        np.take(self._store[:, :width], rows, axis=0, out=tables)
        logits = buf.logits[: len(sample_rows)]
        logits[:] = qsl[1:][sample_rows] - 1 if sample_rows else 0
        dev, nb = self.device, self.device.type == "cuda"
        tokens_t = buf.tokens_t[:, :num_tokens]
        if dev.type != "cpu":
            tokens_t = tokens_t.to(dev, non_blocking=nb)
        return StepInputs(
            input_ids=tokens_t[0],
            positions=tokens_t[1],
            slot_mapping=tokens_t[2],
            prompt_lens=tokens_t[3],
            block_tables=buf.tables_t[:num_seqs, :width].to(dev, non_blocking=nb),
            seq_lens=buf.rows_t[0, :num_seqs].to(dev, non_blocking=nb),
            query_start_loc=buf.rows_t[1, : num_seqs + 1].to(dev, non_blocking=nb),
            logits_indices=buf.logits_t[: len(sample_rows)].to(dev, non_blocking=nb),
            query_lens=query_lens,
            seq_lens_host=seq_lens.tolist(),
            seq_ids=seq_ids,
            sample_rows=sample_rows,
            block_size=bs,
            host_query_start_loc=qsl.tolist(),
            host={"tokens": tok, "tables": tables, "seq_lens": seq_lens},
            lora_ids=lora_ids if any(lora_ids) else [],
        )
