"""lmforge: a Kubernetes-native operator and runtime for LLM training, quantization and serving.

The repository root is this package (see pyproject's package-dir): `operator/` imports as
`lmforge.operator`, `runtime/` as `lmforge.runtime`, `kernels/` as `lmforge.kernels`. Those three
folders have no `__init__.py` on purpose: as PEP 420 namespace portions they can never shadow the
stdlib `operator` or the `kernels` distribution when the checkout is on sys.path (a `python -m` or
`python -c` run inside it); tests/test_install.py holds that line.

`from lmforge import LLM, SamplingParams` mirrors vLLM's offline API. The runtime names load on
first access, so `import lmforge` (the operator image, `lmforge --help`) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

API_GROUP = "lmforge.dev"
API_VERSION = "v1alpha1"

if TYPE_CHECKING:
    from lmforge.runtime.llm import LLM
    from lmforge.runtime.lora.request import LoRARequest
    from lmforge.runtime.outputs import CompletionOutput, RequestOutput
    from lmforge.runtime.sampling_params import SamplingParams

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "LLM",
    "LoRARequest",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "__version__",
]

_LAZY = {
    "LLM": "lmforge.runtime.llm",
    "LoRARequest": "lmforge.runtime.lora.request",
    "SamplingParams": "lmforge.runtime.sampling_params",
    "RequestOutput": "lmforge.runtime.outputs",
    "CompletionOutput": "lmforge.runtime.outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
