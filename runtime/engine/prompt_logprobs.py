"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs=k`): for every prompt token after the
first, its logprob given the tokens before it, its rank, and the k most likely alternatives.

The logits at position q score token q + 1, so a prefill chunk over positions [start, end) of a
P-token prompt scores tokens start+1 .. min(end, P-1): every position of the chunk except a last
one that samples. Chunks run in order, so the entries accumulate in order on
`Sequence.prompt_logprobs`; the prefix cache never skips a position still to be scored (see
BlockManager.get_computed_blocks), and positions recomputed after a preemption are not scored twice.
Only those rows get full-vocabulary logits (log_softmax in fp32); requests that did not ask cost
nothing. Rows are scored `max_rows` at a time so that a long chunk never holds [chunk, vocab] fp32
logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.outputs import Logprob

MAX_ROWS = 256  # rows of logits alive at once (the profiled dummy step holds max_num_seqs rows)


def positions_to_score(seq: Sequence, start: int, end: int) -> range:
    """Positions in [start, end) (a step's tokens) whose logits give a prompt logprob `seq` still owes."""
    pending = seq.num_prompt_logprobs_pending
    if not pending:
        return range(0)
    first = len(seq.prompt_logprobs)
    assert start <= first, f"prompt logprobs of positions {first}..{start - 1} were skipped"
    return range(max(start, first), min(end, first + pending))


@dataclass(slots=True)
class PromptLogprobsBatch:
    """One step's rows to score, in flattened-input order."""

    rows: list[int] = field(default_factory=list)  # row of the step's input (= of its hidden states)
    targets: list[int] = field(default_factory=list)  # the prompt token that row's logits score
    num_top: list[int] = field(default_factory=list)  # the request's k
    seq_rows: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, number of rows)

    def add(self, seq: Sequence, start: int, end: int, first_row: int) -> None:
        """`seq` computes positions [start, end) at rows first_row, first_row + 1, ... this step."""
        positions = positions_to_score(seq, start, end)
        if not positions:
            return
        assert seq.params.prompt_logprobs is not None  # positions_to_score: none without it
        self.rows += [first_row + p - start for p in positions]
        self.targets += seq.token_ids[positions.start + 1 : positions.stop + 1]
        self.num_top += [seq.params.prompt_logprobs] * len(positions)
        self.seq_rows.append((seq.seq_id, len(positions)))

    def row_chunks(self, max_rows: int = MAX_ROWS) -> list[list[int]]:
        """The row sets `compute` asks `row_logits` for, in order."""
        return [self.rows[i : i + max_rows] for i in range(0, len(self.rows), max_rows)]

    def compute(
        self, row_logits: Callable[[list[int]], torch.Tensor], max_rows: int = MAX_ROWS
    ) -> dict[int, list[dict[int, Logprob]]]:
        """seq_id -> its new entries, in position order; `row_logits(rows)` gives logits [len(rows), V]."""
        entries: list[dict[int, Logprob]] = []
        for i in range(0, len(self.rows), max_rows):
            logits = row_logits(self.rows[i : i + max_rows])
            entries += score_rows(logits, self.targets[i : i + max_rows], self.num_top[i : i + max_rows])
        out, i = {}, 0
        for seq_id, n in self.seq_rows:
            out[seq_id] = entries[i : i + n]
            i += n
        return out


def score_rows(logits: torch.Tensor, targets: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row of `logits` [N, V]: {target: Logprob, then the row's top num_top[row] ids}. The target
    comes first and keeps its entry when it is also among the top k (vLLM's order)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    target = torch.tensor(targets, device=logprobs.device)[:, None]  # [N, 1]
    target_lp = logprobs.gather(1, target)  # [N, 1]
    rank = (logprobs >= target_lp).sum(-1, keepdim=True)  # [N, 1]
    k = min(max(num_top), logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # [N, k]
    # one device -> host copy; float64 holds every token id and rank exactly
    host = torch.cat([t.double() for t in (target_lp, rank, top_lp, top_ids)], dim=1).cpu().tolist()
    result: list[dict[int, Logprob]] = []
    for row, n in zip(host, num_top, strict=True):
        entry = {targets[len(result)]: Logprob(row[0], int(row[1]))}
        for j in range(min(n, k)):
            entry.setdefault(int(row[2 + k + j]), Logprob(row[2 + j], j + 1))
        result.append(entry)
    return result
