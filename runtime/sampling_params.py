"""Per-request sampling settings, validated once at construction (the vLLM field names)."""

from __future__ import annotations

from dataclasses import dataclass, field

STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One constraint on the generated text (vLLM's StructuredOutputsParams / guided_* fields),
    enforced token by token with a grammar mask (engine/guided.py). Exactly one field is set."""

    json: str | None = None  # a JSON schema, serialized
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # Lark or GBNF (llama.cpp) grammar text

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured outputs need exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}; "
                f"got {', '.join(given) or 'none'}"
            )
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("structured outputs choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = (
        None  # number of top logprobs per generated token (the sampled one always included)
    )
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: outputs carry token ids only (text stays ""); no stop strings then
    # "cumulative": an output after every step (streaming); "final_only": only when the request ends
    # (offline generate: saves copying every growing output every step, as vLLM's RequestOutputKind)
    output_kind: str = "cumulative"
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        self._check_sampling()
        self._check_outputs()

    def _check_sampling(self) -> None:
        """The distribution knobs: temperature, top-p/k, min-p and the penalties."""
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")

    def _check_outputs(self) -> None:
        """Lengths, logprobs, the output kind, and what stop strings and grammars exclude."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")
        if self.output_kind not in ("cumulative", "final_only"):
            raise ValueError(f"output_kind must be 'cumulative' or 'final_only', got {self.output_kind!r}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (use stop_token_ids to stop on ids)")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}")
        if self.structured_outputs is not None and (self.ignore_eos or self.min_tokens):
            # the grammar's end is EOS: banning it could leave a row with no allowed token
            raise ValueError("ignore_eos and min_tokens cannot be combined with structured outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
