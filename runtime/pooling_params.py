"""Embedding (pooling) settings, validated once (vLLM's PoolerConfig names). Stdlib only: the
serve flags are checked with it before torch loads."""

from __future__ import annotations

import json
from dataclasses import dataclass

POOLING_TYPES = ("LAST", "MEAN")


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How a prompt's final hidden states become one vector: the last token's (what decoder
    embedding models such as e5-mistral / Qwen3-Embedding train for) or the mean over all tokens,
    then L2-normalised unless normalize is false."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def from_json(cls, text: str | None) -> PoolerConfig:
        """`--pooler-config` text; an unknown key is refused by name, never ignored."""
        if text is None:
            return cls()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("must be a JSON object")
        unknown = sorted(set(raw) - {"pooling_type", "normalize"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: pooling_type, normalize")
        pooling_type = raw.get("pooling_type", "LAST")
        return cls(
            pooling_type.upper() if isinstance(pooling_type, str) else pooling_type,
            raw.get("normalize", True),
        )
