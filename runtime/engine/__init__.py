"""The inference engine: sequence, block_manager, scheduler (pure Python), model_runner, sampler,
detokenizer, llm_engine. `LLMEngine`, `EngineArgs` and `EngineStats` load lazily so that importing
the pure modules never pulls in torch."""

from __future__ import annotations

from typing import Any

__all__ = ["EngineArgs", "EngineStats", "LLMEngine"]


def __getattr__(name: str) -> Any:
    if name == "EngineArgs":
        from lmforge.runtime.engine.config import EngineArgs

        return EngineArgs
    if name in ("LLMEngine", "EngineStats"):
        from lmforge.runtime.engine import llm_engine

        return getattr(llm_engine, name)
    raise AttributeError(f"module 'lmforge.runtime.engine' has no attribute {name!r}")
