"""Shared by the engine benchmarks: model shapes, the bytes a decode step must read, copy bandwidth,
and the environment record written next to every result.

Shapes are random-init models with the dimensions of real ones (no weights can be downloaded
here): the benchmark writes only config.json + a small tokenizer, and the engine loads them with
`load_format="dummy"`. Token ids above the tokenizer's vocabulary are fine because outputs are
not detokenized.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import re
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
    ),
    # a ~250M-parameter Llama: the CPU bf16 batch-1 decode comparison of issue #24
    "llama-250m": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
        tie_word_embeddings=False,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 1024},
    ),
    # bench/engine_overhead.py: the host path around a no-op forward (issue #24's Llama shape)
    "llama-512x8": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=32000,
        tie_word_embeddings=False,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 1024},
    ),
    # a ~200M-parameter Llama that a CPU runs in seconds per step (bench/tensor_parallel.py's default)
    "small": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=4096,
        vocab_size=32000,
        tie_word_embeddings=False,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
    ),
    # CPU smoke runs of the scripts (tests): same code path, seconds instead of minutes
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=True,
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 32},
    ),
}


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every engine benchmark has; each script adds its own workload options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (to see what they bring)")
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    p.add_argument("--save", action="store_true", help="also write bench/results/<name>-<gpu>-<time>.json")
    return p


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    """Collect the last engine (its reference cycles too) and give its cached device memory back."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write_shape(path: pathlib.Path, shape: str, max_position_embeddings: int) -> pathlib.Path:
    """config.json (transformers 4 layout, which 5 also reads) + a byte-level BPE tokenizer."""
    from lmforge.runtime.models.tiny import build_tokenizer

    dims = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    # transformers warns unless the llama3 rope's original context is below the model's
    max_position_embeddings = max(
        max_position_embeddings, dims["rope_scaling"]["original_max_position_embeddings"] + 1
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **dims,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer().save_pretrained(path)
    return path


def decode_step_bytes(
    model: Any, config: dict[str, Any], batch: int, mean_context: float, kv_itemsize: int
) -> dict:
    """Bytes one decode step must read from memory: every weight once (the input embedding is a row
    lookup unless it doubles as the tied LM head) plus each sequence's K and V so far."""
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if config["tie_word_embeddings"] or "embed_tokens" not in name
    )
    kv_per_token = (
        2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * kv_itemsize
    )
    kv_bytes = int(batch * mean_context * kv_per_token)
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "total": weight_bytes + kv_bytes}


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device memory bandwidth: a 1 GiB copy (read + write bytes / time), median of 20."""
    import torch

    nbytes = 1 << 30 if device.startswith("cuda") else 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start = _now(device)
        dst.copy_(src)
        times.append(_now(device) - start)
    times = sorted(times[2:])
    return 2 * nbytes / times[len(times) // 2] / 1e9


def _now(device: str) -> float:
    import time

    sync(device)
    return time.perf_counter()


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import transformers

    env["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def save(report: dict[str, Any], name: str) -> pathlib.Path:
    """bench/results/<name>-<gpu or cpu>-<utc time>.json"""
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    where = re.sub(r"[^A-Za-z0-9]+", "-", report["env"].get("gpu", "cpu")).strip("-").lower()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{name}-{where}-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def cuda_missing(device: str) -> bool:
    import torch

    return device.startswith("cuda") and not torch.cuda.is_available()
