"""Continuous batching, vLLM v1 style: no prefill/decode phases, only a token budget per step.

Each step gives every running sequence the tokens it still lacks (one for a decode, the rest of
its prompt, capped by the budget, for a chunked prefill), then admits waiting sequences FCFS while
budget, `max_num_seqs` and free blocks last. When a running sequence cannot get a block, the
newest running sequence is preempted (blocks freed, recomputed later from its tokens so far).
With sliding windows on every layer, each step's `allocate_slots` first releases the blocks that fell
behind the window (block_manager.py), so a long-running sequence keeps giving blocks back.
No torch here: the scheduler talks to the runner through `SchedulerOutput` and sampled token ids.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.runtime.engine.block_manager import BlockManager
from lmforge.runtime.engine.sequence import PLACEHOLDER_TOKEN, FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    long_prefill_token_threshold: int = 0  # >0: cap one sequence's prefill chunk (fairness)
    max_loras: int = 0  # >0: at most this many distinct LoRA adapters among running sequences (the slots)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute tokens [seq.num_computed_tokens, + num_new_tokens)
    block_ids: list[int]  # the whole block table after allocation

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so its logits give a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_seq(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:  # running first, oldest first
            seq = self.running[i]
            if seq.num_pending and self._length_reached(seq, seq.num_tokens):
                i += 1  # async: its in-flight token is its last; it finishes when that token lands
                continue
            num_new = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()  # newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.scheduled.append(ScheduledSeq(seq, num_new, self.block_manager.get_block_ids(seq)))
            budget -= num_new
            i += 1
        if not out.preempted:  # admit new work only when nothing had to give way this step
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        held: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_lead(seq) or not self._adapter_fits(seq):
                held.append(self.waiting.popleft())
                continue
            computed, num_cached = self.block_manager.get_computed_blocks(seq)
            num_new = self._chunk(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate_slots(seq, num_new, computed):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, self.block_manager.get_block_ids(seq)))
            budget -= num_new
        self.waiting.extendleft(reversed(held))

    def _chunk(self, num_tokens: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            num_tokens = min(num_tokens, threshold)
        return min(num_tokens, budget)

    def _adapter_fits(self, seq: Sequence) -> bool:
        """A LoRA sequence starts when its adapter already runs or a device slot is left for it (the pool
        holds max_loras adapters; one used by a running sequence is never evicted)."""
        if not seq.lora_id or not self.config.max_loras:
            return True
        running = {s.lora_id for s in self.running if s.lora_id}
        return seq.lora_id in running or len(running) < self.config.max_loras

    def running_adapters(self) -> set[int]:
        return {s.lora_id for s in self.running if s.lora_id}

    def _waits_for_lead(self, seq: Sequence) -> bool:
        """n>1 siblings start once sample 0 has computed the prompt, then reuse its cached blocks."""
        lead = seq.lead
        if lead is None or not self.block_manager.enable_prefix_caching or lead.is_finished:
            return False
        return lead.status is SequenceStatus.WAITING or lead.num_computed_tokens < lead.num_prompt_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advances computed counts; appends each sampled token (seq_id -> token id). Returns the
        sequences that received a token, in schedule order."""
        advanced = []
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += s.num_new_tokens
            if seq.seq_id in sampled:
                seq.append_token(sampled[seq.seq_id])
                advanced.append(seq)
        return advanced

    def on_launch(self, out: SchedulerOutput) -> None:
        """Async scheduling: a step was launched; its tokens count as computed and each sampling sequence
        gets a placeholder for the token it will receive, so the next schedule sees the state after it."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            sampling = s.samples
            seq.num_computed_tokens += s.num_new_tokens
            if sampling:
                seq.token_ids.append(PLACEHOLDER_TOKEN)
                seq.num_pending += 1

    def on_tokens(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[tuple[Sequence, int]]:
        """Async scheduling: the launched step `out` finished; fills each live sequence's oldest
        placeholder. Returns (sequence, its token count up to the new token) in schedule order; tokens of
        sequences that ended meanwhile (stop, abort) are dropped."""
        advanced = []
        for s in out.scheduled:
            seq = s.seq
            token = sampled.get(seq.seq_id)
            if token is None or seq.is_finished or not seq.num_pending:
                continue
            advanced.append((seq, seq.fill_pending(token)))
        return advanced

    def _length_reached(self, seq: Sequence, num_tokens: int) -> bool:
        max_tokens = seq.params.max_tokens
        if max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens:
            return True
        return num_tokens >= self.config.max_model_len

    def check_stop(
        self, seq: Sequence, eos_token_ids: set[int], num_tokens: int | None = None
    ) -> FinishReason | None:
        """Token-level stop conditions after a new token (stop strings are the detokenizer's). num_tokens:
        the sequence's length up to that token (async: later placeholders may follow); None: all."""
        if num_tokens is None:
            num_tokens = seq.num_tokens
        params, token = seq.params, seq.token_ids[num_tokens - 1]
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in eos_token_ids:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return FinishReason.STOP
        if self._length_reached(seq, num_tokens):
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence (stop, length or abort), wherever it is, and frees its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.drop_pending()
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = reason
