"""Incremental detokenization with stop strings.

Text is produced as deltas, and the output text is by construction the concatenation of every
delta, so a streaming client that diffs cumulative texts sees exactly the final text.

- Multi-byte UTF-8 (byte-level BPE splits an emoji over several tokens): a delta is only emitted
  once the decoded tail no longer ends in U+FFFD; pending bytes are flushed when the sequence ends.
- SentencePiece-style leading spaces ("▁word" decodes to "word" at the start of a string): the
  window decoded always starts a few tokens back (`prefix_offset`), and the delta is the
  difference between decoding the window with and without the new tokens.
- Stop strings: the text is cut right before the earliest stop string. While running, the last
  len(longest stop) - 1 characters are held back from `output_text`, so a client never sees the
  beginning of a stop string that is later cut.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside the first outputs (leading-space handling)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.token_ids)  # tokens before this are already in `text`
        self.text = ""
        self._rust_decode = _rust_decoder(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or an incomplete UTF-8 character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def update(self, token_id: int) -> str | None:
        """Adds a generated token. Returns the stop string that ended the text, if one did."""
        self.token_ids.append(token_id)
        return self._append(self._advance(final=False))

    def flush(self) -> str | None:
        """The sequence ended: emits bytes still waiting to complete a character."""
        if self.read_offset == len(self.token_ids):
            return None
        return self._append(self._advance(final=True))

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        before = len(self.text)
        self.text += delta
        hits = []
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i != -1:
                hits.append((i, s))
        if not hits:
            return None
        cut, stop = min(hits)
        self.text = self.text[:cut]
        return stop

    def output_text(self, finished: bool) -> str:
        if finished or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]


def _rust_decoder(tokenizer: Any) -> Any:
    """The `tokenizers` decode a fast HF tokenizer calls when clean-up is off (what `decode` returns, minus
    its Python argument handling: about half the time of a decode of a few ids); None when the class
    overrides `_decode` (its own text rules) or has no Rust backend."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4 names it differently: keep the public decode
        return None
    if type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return getattr(backend, "decode", None)


class NullDetokenizer:
    """For `SamplingParams(detokenize=False)`: token ids only, no text (benchmarks, token-level
    clients, and checkpoints whose vocabulary the tokenizer does not cover)."""

    text = ""

    def update(self, token_id: int) -> None:
        return None

    def flush(self) -> None:
        return None

    def output_text(self, finished: bool) -> str:
        return ""
