"""Embeddings from a decoder: the final hidden states of a prompt pooled into one vector.

Prefill only: an embedding sequence is scheduled like any prompt (chunked when long) and finishes
when its last chunk has run; no token is sampled and its KV blocks are freed at once. Chunks of a
sequence arrive over several steps, so MEAN keeps a running sum per sequence; a chunk starting at
position 0 (first or after preemption) restarts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.pooling_params import PoolerConfig


@dataclass(slots=True)
class PoolChunk:
    seq: Sequence
    first_row: int  # where the chunk's tokens start in the step's flattened hidden states
    start: int  # the chunk's first position in the sequence
    num_tokens: int
    is_last: bool  # the chunk reaches the end of the prompt


class Pooler:
    def __init__(self, config: PoolerConfig) -> None:
        self.config = config
        self._sums: dict[int, torch.Tensor] = {}  # seq_id -> fp32 [hidden] sum of the rows so far (MEAN)

    def __call__(self, hidden: torch.Tensor, chunks: list[PoolChunk]) -> dict[int, list[float]]:
        """hidden [T, H] of one step -> {seq_id: embedding} for the sequences whose prompt ended."""
        done = {}
        for c in chunks:
            rows = hidden[c.first_row : c.first_row + c.num_tokens].float()  # [n, H]
            if self.config.pooling_type == "MEAN":
                total = rows.sum(0) if c.start == 0 else self._sums[c.seq.seq_id] + rows.sum(0)
                self._sums[c.seq.seq_id] = total
                if not c.is_last:
                    continue
                vector = self._sums.pop(c.seq.seq_id) / c.seq.num_prompt_tokens
            else:
                if not c.is_last:
                    continue
                vector = rows[-1]
            if self.config.normalize:
                vector = torch.nn.functional.normalize(vector, dim=-1)
            done[c.seq.seq_id] = vector.tolist()
        return done

    def release(self, seq_id: int) -> None:
        self._sums.pop(seq_id, None)
