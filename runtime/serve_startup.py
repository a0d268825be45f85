"""What `lmforge serve` does before the model loads: refuse flags this runtime cannot honour for
the checkpoint at hand, and size torch's CPU thread pool. Stdlib at import time (torch only when
the pool is sized)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lmforge.runtime.serve_args import lora_modules, served_model_names

# --quantization -> (weight bits, weight type) that the checkpoint's compressed-tensors config must declare
QUANTIZATION_WEIGHTS = {"w8a16": (8, "int"), "w4a16": (4, "int"), "fp8": (8, "float")}


def _lora_flags(args: argparse.Namespace) -> str | None:
    """--lora-modules parses, names no served model, and the LoRA flags come with --enable-lora."""
    try:
        adapters = lora_modules(args)
    except ValueError as exc:
        return str(exc)
    clash = set(adapters) & set(served_model_names(args))
    if clash:
        return f"--lora-modules name {sorted(clash)[0]!r} is also a served model name"
    if getattr(args, "allow_runtime_lora_updating", False) and not getattr(args, "enable_lora", False):
        return "--allow-runtime-lora-updating needs --enable-lora"
    return None


def unsupported_model_flags(args: argparse.Namespace) -> str | None:
    """Refuse at start-up, with a reason, what would otherwise fail later or silently differ: a
    checkpoint whose quantization is not the one the InferenceService asked for, and KV cache
    types the engine does not implement yet."""
    if getattr(args, "enable_auto_tool_choice", False) and not getattr(args, "tool_call_parser", None):
        return (
            "--enable-auto-tool-choice needs --tool-call-parser (the format the model writes tool calls in)"
        )
    if getattr(args, "pooler_config", None) is not None:
        if getattr(args, "task", "generate") != "embed":
            return "--pooler-config applies to --task embed only"
        from lmforge.runtime.pooling_params import PoolerConfig

        try:
            PoolerConfig.from_json(args.pooler_config)
        except ValueError as exc:
            return f"--pooler-config: {exc}"
    lora_problem = _lora_flags(args)
    if lora_problem:
        return lora_problem
    if getattr(args, "kv_cache_dtype", "auto") not in ("auto", "int8"):
        return f"--kv-cache-dtype {args.kv_cache_dtype} is not implemented by this runtime yet (use auto or int8)"
    expected = getattr(args, "quantization", None)
    if expected is None:
        return None
    with open(os.path.join(args.model, "config.json")) as f:
        qconfig = json.load(f).get("quantization_config") or {}
    groups = qconfig.get("config_groups") or {}
    found = {
        (g.get("weights") or {}).get("num_bits"): (g.get("weights") or {}).get("type")
        for g in groups.values()
    }
    bits, kind = QUANTIZATION_WEIGHTS[expected]
    if qconfig.get("quant_method") != "compressed-tensors" or found.get(bits) != kind:
        return (
            f"--quantization {expected} but {args.model}/config.json declares "
            f"{qconfig.get('quant_method') or 'no quantization'} {found or ''}".rstrip()
        )
    return None


def local_model_dir(args: argparse.Namespace) -> str | None:
    """--model hf://... or s3://...: download it now (hf:// into the HF cache, shared with the
    trainer and quantizer; s3:// into $LMFORGE_MODEL_DIR or /tmp/lmforge-models/<uri hash>),
    and point args.model at the local copy; returns an error message, or None. Pods of an
    InferenceService get the files from their storage initializer instead (`lmforge fetch` in an
    init container), so this is for `lmforge serve` run by hand."""
    source = args.model
    if not source.startswith(("hf://", "s3://")):
        return None
    from lmforge.runtime import hub
    from lmforge.runtime.storage import cache as node_cache
    from lmforge.runtime.storage.s3 import StorageError
    from lmforge.runtime.storage.transfer import fetch
    from lmforge.runtime.storage.uri import URIError, parse

    try:
        uri = parse(source, "--model")
        if uri.scheme == "hf" and uri.revision is None:
            local = str(hub.resolve(source, what="--model"))
        elif uri.scheme == "hf":  # a pinned revision: its own directory
            local = fetch(source, hub.cache_dir() / "lmforge-revisions" / node_cache.key(source)).path
        else:
            target = os.environ.get("LMFORGE_MODEL_DIR") or os.path.join(
                "/tmp/lmforge-models", node_cache.key(source)
            )
            local = fetch(source, Path(target)).path
    except (URIError, StorageError, hub.HubError, OSError) as exc:
        return str(exc)
    args.model_source, args.model = source, local
    return None


def limit_cpu_threads() -> None:
    """Leave one core to the HTTP event loop. torch's intra-op pool otherwise takes every core and
    the engine thread and the server thread preempt each other: measured on 2 cores, one engine
    step went from 1.8 ms to 18 ms. An explicit OMP_NUM_THREADS always wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
