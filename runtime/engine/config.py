"""EngineArgs: every knob of `LLM(...)` / `LLMEngine(...)`, validated once (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.runtime.lora.config import LoRAConfig
from lmforge.runtime.pooling_params import PoolerConfig

TASKS = ("generate", "embed")
TP_CHANNELS = ("shm", "broadcast")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}

KV_CACHE_DTYPES = ("auto", "int8")  # fp8 is not implemented yet
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights, only config.json (+ tokenizer) is read


@dataclass
class EngineArgs:
    model: str | Path
    tokenizer: str | Path | None = None  # defaults to `model`
    dtype: str = "auto"  # auto: float32 on CPU; the checkpoint's bf16/fp16 (else bf16) on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # explicit KV cache size; None: profile (CUDA) or cpu_kv_cache_gb
    seed: int = 0
    enforce_eager: bool = (
        False  # True: no CUDA graphs (decode steps are captured per batch size on CUDA + triton)
    )
    cpu_kv_cache_gb: float = 0.25  # KV cache budget when running on CPU and num_blocks is None
    long_prefill_token_threshold: int = 0  # >0: cap any one sequence's prefill chunk per step
    max_logprobs: int = 20
    attention_backend: str = (
        "auto"  # auto: "triton" (lmforge.kernels) on CUDA, "torch" (SDPA reference) on CPU
    )
    kv_cache_dtype: str = (
        "auto"  # auto: the model dtype; "int8": per-(token, head) absmax/127 codes + fp32 scales
    )
    load_format: str = "auto"  # auto: safetensors in `model`; "dummy": random init (benchmarks of a shape)
    task: str = "generate"  # "embed": every request is a prompt pooled into an embedding (engine/pooler.py)
    pooler_config: PoolerConfig | None = None  # task "embed": LAST + normalize when None
    # schedule and prepare step n+1 while step n runs (llm_engine.py); None: on for CUDA, off on CPU
    async_scheduling: bool | None = None
    enable_lora: bool = False  # serve LoRA adapters (runtime/lora): requests pick one by LoRARequest
    max_loras: int = 1  # adapters in device slots at once = most distinct adapters in one batch
    max_lora_rank: int = 16  # largest adapter rank served
    max_cpu_loras: int | None = None  # adapters kept in host memory (None: max_loras)
    lora_modules: dict[str, str] | None = None  # name -> PEFT adapter directory, loaded at start
    # tensor parallelism: one process per rank (rank 0 is this one), the model's heads, MLP rows and
    # vocabulary split across them (models/parallel.py); NCCL on CUDA, gloo on CPU
    tensor_parallel_size: int = 1
    tp_channel: str = "shm"  # the per-step message to the workers: "shm" ring or gloo "broadcast"
    tp_timeout_s: float = 60.0  # a step (or collective) taking longer means a hung worker: fatal

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.pooler_config is not None and self.task != "embed":
            raise ValueError("pooler_config applies to task='embed' only")
        self._check_lora()
        self._check_tensor_parallel()
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    def _check_lora(self) -> None:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora=True")
        self.lora_config()  # validates max_loras / max_lora_rank / max_cpu_loras

    def lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def _check_tensor_parallel(self) -> None:
        if self.async_scheduling and self.task == "embed":
            raise ValueError("async_scheduling applies to task='generate' only (embed samples nothing)")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                "async_scheduling applies to tensor_parallel_size=1 only (the workers' input ids would"
                f" hold placeholders), got tensor_parallel_size={self.tensor_parallel_size}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        if self.tp_channel not in TP_CHANNELS:
            raise ValueError(f"tp_channel must be one of {TP_CHANNELS}, got {self.tp_channel!r}")
        if not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be positive, got {self.tp_timeout_s}")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return device


def resolve_dtype(
    dtype: str | torch.dtype, checkpoint_dtype: str | None, device: torch.device
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        ckpt = _DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
        return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
