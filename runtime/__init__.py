"""lmforge.runtime: what the pods run (inference engine + OpenAI server, trainer, quantizer).

`from lmforge.runtime import LLM, SamplingParams` mirrors vLLM's offline API. Heavy modules
(torch, transformers) load on first attribute access, so `lmforge --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.runtime.outputs import CompletionOutput, RequestOutput
from lmforge.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmforge.runtime.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lmforge.runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'lmforge.runtime' has no attribute {name!r}")
