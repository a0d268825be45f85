"""Request and sequence state. Pure Python: the scheduler and block manager read it, never torch.

A `Request` owns `n` `Sequence`s (one per sample). Each sequence carries the token ids so far
(prompt + generated) and `num_computed_tokens`, the prefix whose K/V are in the cache; the next
step computes tokens [num_computed_tokens, num_tokens).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

from lmforge.runtime.outputs import Logprob
from lmforge.runtime.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


_seq_ids = itertools.count()
PLACEHOLDER_TOKEN = -1  # async scheduling: a sampled token still on the device (see Sequence.num_pending)


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are cached (valid while RUNNING)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks, filled lazily
    lead: Sequence | None = None  # n>1: siblings wait for sample 0's prompt so they share its blocks
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # prompt_logprobs requests, sample 0 only: one dict per prompt token from the second on, in
    # order, appended chunk by chunk (entry i scores token i + 1, from the logits at position i)
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    detokenizer: Any = None  # the engine's IncrementalDetokenizer; opaque here
    # async scheduling: the last num_pending entries of token_ids are PLACEHOLDER_TOKEN, tokens sampled
    # by launched steps whose ids have not reached the host yet (the next step reads them on the device)
    num_pending: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    lora_id: int = 0  # the LoRA adapter it runs with (LoRAManager's id); 0: the base model

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (placeholders of in-flight steps excluded)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (all of them unless async steps are in flight)."""
        return len(self.token_ids) - self.num_pending

    def fill_pending(self, token_id: int) -> int:
        """The oldest placeholder's real id arrived; returns the token count up to and including it."""
        index = len(self.token_ids) - self.num_pending
        self.token_ids[index] = token_id
        self.num_pending -= 1
        return index + 1

    def drop_pending(self) -> None:
        """The sequence ended: tokens of steps launched after its last one are not part of it."""
        if self.num_pending:
            del self.token_ids[len(self.token_ids) - self.num_pending :]
            self.num_pending = 0

    @property
    def num_prompt_logprobs_pending(self) -> int:
        """Prompt tokens whose logprobs this sequence still owes: the logits at positions
        len(prompt_logprobs) .. num_prompt_tokens - 2 must be computed, never read from the prefix
        cache. Only sample 0 computes them; n>1 siblings share its prompt."""
        if self.params.prompt_logprobs is None or self.lead is not None:
            return 0
        return self.num_prompt_tokens - 1 - len(self.prompt_logprobs)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    embedding: list[float] | None = None  # task "embed": set when the prompt has been pooled

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [
                Sequence(
                    self.request_id,
                    i,
                    list(self.prompt_token_ids),
                    len(self.prompt_token_ids),
                    _child_params(self.params, i),
                    arrival_time=self.arrival_time,
                )
                for i in range(self.params.n)
            ]
            for seq in self.seqs[1:]:
                seq.lead = self.seqs[0]

    @property
    def finished(self) -> bool:
        for seq in self.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample i of a seeded n>1 request draws from seed + i (vLLM's convention)."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=params.seed + index)
