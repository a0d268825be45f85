"""Multi-LoRA serving: many PEFT adapters on one base model, mixed in one continuous batch.

request.py   LoRARequest (vLLM's name): which adapter a request runs with
config.py    LoRAConfig: --max-loras / --max-lora-rank / --max-cpu-loras, validated
adapter.py   read a PEFT adapter directory, refuse what we do not compute, check it against the base
layers.py    LoRALinear: wraps a base linear (dense, fused q/k/v or gate/up, quantized) and adds
             scale * x A^T B^T per token through the shrink / expand kernels (kernels/lora.py)
manager.py   LoRAManager: registry, CPU cache (LRU of C), GPU slot pool (K, LRU, in-use pinned)
"""

from lmforge.runtime.lora.config import LoRAConfig
from lmforge.runtime.lora.request import LoRARequest

__all__ = ["LoRAConfig", "LoRARequest"]
