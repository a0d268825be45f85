"""Guided decoding: one llguidance matcher per constrained sequence, one bitmask row per step.

Why llguidance (bench/guided_backends.py, 32k-vocab BPE, an agent JSON schema, 2 busy CPU cores):
it compiles a schema in ~2 ms where xgrammar 0.2.8 takes 3-5 s, and agents bring a new schema (tools,
response formats) with nearly every request, so compile time sits in front of every first token;
xgrammar's batch-64 mask fill is faster (7-20 ms vs ~38 ms), but the fill overlaps the GPU forward
(ModelRunner.execute computes it after launching the forward) and only constrained rows pay it.

Contract with the runner: `add` when a sequence is queued (a grammar the library rejects is a
ValueError, so the request fails at admission), `fill_bitmask` for the rows about to be sampled,
`accept` each sampled token, `release` when the sequence ends. Unconstrained rows never reach here.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import torch

from lmforge.runtime.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger("lmforge.runtime.engine.guided")

# Compact JSON (no free whitespace between tokens, as vLLM's default): a model cannot wander off
# into endless newlines, and outputs stay short.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def grammar_for(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint; ValueError naming the constraint when it is invalid.
    Pure (no tokenizer): the server calls it too, to answer a bad schema with a 400 before queuing."""
    import llguidance

    kind = spec.kind
    value = getattr(spec, kind)  # the one constraint that is set (`kind` names its field)
    try:
        if kind in ("json", "json_object"):
            schema = value if kind == "json" else json.dumps({"type": "object"})
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", value)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", json.dumps(list(value)))
        else:
            grammar = llguidance.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
    except Exception as exc:  # noqa: BLE001 - the library's own message says what is wrong
        raise ValueError(f"invalid {kind} constraint: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid {kind} constraint: {error}")
    return grammar


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: bit t % 32 of word t // 32 allows token t."""
    return (vocab_size + 31) // 32


class GuidedDecoder:
    """Matchers of the running constrained sequences, keyed by seq_id. Built lazily by the runner on
    the first constrained request (tokenizer conversion costs ~0.5 s for a 32k vocabulary)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], num_threads: int | None = None
    ):
        import llguidance
        import llguidance.hf

        # n_vocab: the model's logits width, which may exceed the tokenizer's (padded embeddings)
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self._executor = llguidance.LLExecutor(num_threads)
        self._matcher_cls = llguidance.LLMatcher
        self.vocab_size = vocab_size
        self.matchers: dict[int, Any] = {}  # seq_id -> LLMatcher

    def add(self, seq_id: int, spec: StructuredOutputsParams) -> None:
        matcher = self._matcher_cls(self._tokenizer, grammar_for(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind} constraint: {matcher.get_error()}")
        self.matchers[seq_id] = matcher

    def has(self, seq_id: int) -> bool:
        return seq_id in self.matchers

    def fill_bitmask(self, seq_ids: list[int]) -> torch.Tensor:
        """[len(seq_ids), bitmask_width] int32 on CPU, row i for seq_ids[i], filled in parallel by
        llguidance's thread pool (what llguidance.torch.fill_next_token_bitmask_par does; that module
        is not imported: its torch.compile decorator costs tens of seconds at import)."""
        width = bitmask_width(self.vocab_size)
        bitmask = torch.empty(len(seq_ids), width, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(self.matchers[s], row) for row, s in enumerate(seq_ids)],
            bitmask.data_ptr(),
            width * 4,
            len(seq_ids),
        )
        return bitmask

    def accept(self, seq_id: int, token_id: int) -> None:
        """Advances the matcher; the mask only allowed grammatical tokens, so a refusal is a bug
        (logged, the matcher stays in its error state and allows only EOS from then on)."""
        matcher = self.matchers[seq_id]
        if not matcher.consume_token(token_id):
            logger.error(
                "guided decoding: seq %d token %d refused: %s", seq_id, token_id, matcher.get_error()
            )

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
