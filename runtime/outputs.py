"""What the engine hands back: vLLM's RequestOutput/CompletionOutput shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """vLLM's Logprob: one token's log-probability, its 1-based rank in the distribution (ties
    count: rank = number of tokens at least as likely) and its text alone (None without detokenize)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token: None for the first (nothing scores it), then {token id: Logprob} holding the
# prompt token itself plus the request's top-k alternatives.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # one dict per generated token: {token_id: logprob}
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # arrival/first-token/finish times (monotonic s)
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs; see PromptLogprobs
    embedding: list[float] | None = None  # task "embed": the pooled prompt (outputs then hold no tokens)
