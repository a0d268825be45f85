"""`lmforge serve` arguments. Imported by the CLI for `--help`: stdlib only, no torch/fastapi."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "LMFORGE_API_KEY"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # runtime/tool_parsers.py (a test keeps them equal)
TASKS = ("generate", "embed")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the server's flags (vLLM's names where one exists) to `parser` and returns it."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="HF checkpoint directory (config.json, *.safetensors, tokenizer files), or hf://org/name[@rev] "
        "or s3://bucket/prefix, downloaded first (see `lmforge fetch`)",
    )
    model.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="name clients put in `model` (repeatable; the first is reported); "
        "default: the basename of --model",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights/activations dtype; auto: bfloat16 on cuda, float32 on cpu",
    )
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    model.add_argument(
        "--quantization",
        default=None,
        choices=["w8a16", "w4a16", "fp8"],
        help="expected weight quantization; checked against the checkpoint's quantization_config "
        "(default: whatever the checkpoint declares)",
    )
    model.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests (default: 0)")

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="context length (prompt + output); default: the model config's",
    )
    engine.add_argument(
        "--block-size", type=_positive_int, default=16, help="tokens per KV cache block (default: 16)"
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.9,
        help="fraction of device memory the engine may use (default: 0.9)",
    )
    engine.add_argument(
        "--max-num-seqs", type=_positive_int, default=256, help="most sequences in one batch (default: 256)"
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="most tokens in one step; default: the engine's",
    )
    engine.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of shared prompt prefixes (default: on)",
    )
    engine.add_argument(
        "--num-blocks",
        type=_positive_int,
        default=None,
        help="KV cache blocks; default: sized from --gpu-memory-utilization",
    )
    engine.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8", "fp8"],
        help="KV cache element type: auto (the model dtype) or int8 (per-token-head scales, "
        "~2x the blocks of bf16); fp8 is not implemented yet",
    )
    engine.add_argument(
        "--task",
        default="generate",
        choices=TASKS,
        help="generate: completions/chat/responses; embed: /v1/embeddings only, pooled hidden "
        "states of the decoder (prefill only, no KV kept) (default: generate)",
    )
    engine.add_argument(
        "--pooler-config",
        default=None,
        metavar="JSON",
        help='--task embed: {"pooling_type": "LAST" or "MEAN", "normalize": true/false} '
        "(default: LAST, normalized)",
    )
    engine.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive_int,
        default=1,
        help="split the model over this many GPUs (one process per rank, NCCL; gloo on cpu) (default: 1)",
    )
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="auto: the checkpoint's safetensors; dummy: random weights from config.json "
        "alone (benchmarks of a model shape, as vLLM's --load-format dummy)",
    )

    lora = parser.add_argument_group("lora")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters beside the base model")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME=PATH",
        help='adapters loaded at start: name=path or JSON {"name": ..., "path": ...}; clients pick one '
        "by putting its name in `model`",
    )
    lora.add_argument(
        "--max-loras",
        type=_positive_int,
        default=1,
        help="adapters resident on the device at once = most distinct adapters in one batch (default: 1)",
    )
    lora.add_argument(
        "--max-lora-rank", type=_positive_int, default=16, help="largest adapter rank served (default: 16)"
    )
    lora.add_argument(
        "--max-cpu-loras",
        type=_positive_int,
        default=None,
        help="adapters kept in host memory, LRU (default: --max-loras); others are re-read from disk",
    )
    lora.add_argument(
        "--allow-runtime-lora-updating",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true"),
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (API key applies; "
        f"default: ${RUNTIME_LORA_ENV}, vLLM's switch)",
    )

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    server.add_argument(
        "--max-queue",
        type=_positive_int,
        default=None,
        help="reject a new request with HTTP 429 when this many are already waiting (default: unbounded)",
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` on /v1/* (default: ${API_KEY_ENV}); "
        "/health, /metrics and /version stay open",
    )
    server.add_argument(
        "--graceful-shutdown-seconds",
        type=float,
        default=30.0,
        help="after SIGTERM: refuse new requests (503) and let in-flight ones finish for "
        "up to this long, then exit 0 (default: 30)",
    )
    server.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='serve tool_choice "auto": the model decides, --tool-call-parser reads its calls',
    )
    server.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="the model family's tool-call format: hermes (Hermes, Qwen 2.5/3), llama3_json "
        "(Llama 3.x), mistral",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    return parser


def lora_modules(args: argparse.Namespace) -> dict[str, str]:
    """--lora-modules as name -> path; ValueError naming the entry when malformed or without
    --enable-lora."""
    import json

    entries = getattr(args, "lora_modules", None) or []
    if entries and not getattr(args, "enable_lora", False):
        raise ValueError("--lora-modules needs --enable-lora")
    modules: dict[str, str] = {}
    for entry in entries:
        if entry.lstrip().startswith("{"):
            try:
                spec = json.loads(entry)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'--lora-modules {entry!r}: expected JSON {{"name": ..., "path": ...}}'
                ) from None
        else:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {entry!r}: expected name=path")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[str(name)] = str(path)
    return modules


def served_model_names(args: argparse.Namespace) -> list[str]:
    if args.served_model_name:
        return list(args.served_model_name)
    source = getattr(args, "model_source", None) or args.model  # hf://org/name -> name, not a cache path
    return [os.path.basename(os.path.normpath(source.split("@", 1)[0]))]
