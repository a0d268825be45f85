"""One quantization run: load -> reference logits -> quantize -> compare -> write -> report.

The HF model (transformers) is the working copy: it computes in fp32 on CPU (in the checkpoint dtype
on CUDA), each scheme replaces the target weights by their dequantized values as it goes, and the
written scales and unquantized tensors use the storage dtype (the checkpoint's, or --dtype).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.runtime import hub
from lmforge.runtime.quantize import checkpoint, experts, report
from lmforge.runtime.quantize.calibration import load_text_data
from lmforge.runtime.quantize.config import QuantizeError, QuantizeOptions, matches, quantization_config
from lmforge.runtime.quantize.schemes import FP8, make_scheme

Log = Callable[[str], None]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Projections that serving engines fuse into one matrix: they must share scheme and ignore status.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def resolve_model_dir(model: str) -> Path:
    """A local directory, hostPath:///dir, hf://org/name (downloaded, see lmforge.runtime.hub; a
    failed download raises HubError naming the URI) or s3://bucket/prefix (downloaded once per node,
    see lmforge.runtime.storage.staging; StorageError naming the URI)."""
    if hub.is_hf_uri(model):
        path = hub.resolve(model, repo_type="model", what="model")
    elif model.startswith("s3://"):
        from lmforge.runtime.storage import staging
        from lmforge.runtime.storage.s3 import StorageError

        try:
            path = staging.local_input(model)
        except StorageError as exc:
            raise StorageError(f"model: {exc}") from exc
    else:
        path = Path(model.removeprefix("hostPath://"))
    if not (path / "config.json").is_file():
        raise QuantizeError(f"{model} is not an HF checkpoint directory (no config.json)")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise QuantizeError(f"--device {device}: no CUDA device is available")
    return resolved


def storage_dtype(option: str, hf_config: dict[str, Any]) -> torch.dtype:
    name = (
        option if option != "auto" else (hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    )
    if name not in _DTYPES:
        raise QuantizeError(f"unsupported checkpoint dtype {name!r}; pass --dtype float32|float16|bfloat16")
    return _DTYPES[name]


def target_linears(model: nn.Module, ignore: list[str], bits: int, group_size: int) -> dict[str, nn.Linear]:
    """Every nn.Linear not ignored; checks the fused-projection and group-size constraints."""
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            classes = [cls.__name__ for cls in type(module).__mro__]
            if not matches(name, ignore, classes):
                targets[name] = module
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in linear_names:
        parent, _, leaf = name.rpartition(".")
        for fused in FUSED:
            if leaf == fused[0]:
                siblings = [f"{parent}.{part}" for part in fused if f"{parent}.{part}" in linear_names]
                status = {s in targets for s in siblings}
                if len(status) > 1:
                    raise QuantizeError(
                        f"{', '.join(siblings)} are fused by serving engines: ignore all or none of them"
                    )
    bad = [
        f"{name} (in_features {m.in_features})"
        for name, m in targets.items()
        if (group_size > 0 and m.in_features % group_size) or (m.in_features * bits) % 32
    ]
    if bad:
        raise QuantizeError(
            f"group size {group_size} does not divide the input size of {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}: pick a group size that does (32, 64, 128) "
            "or --ignore those modules"
        )
    if not targets:
        raise QuantizeError("no Linear module left to quantize (check --ignore)")
    return targets


def refuse_conv1d(model: nn.Module, hf_config: dict[str, Any]) -> None:
    """GPT-2-style checkpoints keep their projections in transformers' Conv1D ([in, out] weights): neither
    compressed-tensors nor this quantizer handles those, so the family is refused rather than left dense."""
    conv = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv:
        raise QuantizeError(
            f"model_type {hf_config.get('model_type')!r} stores its projections as transformers "
            f"Conv1D modules ({conv[0]}, ... {len(conv)} of them), which compressed-tensors "
            "checkpoints cannot hold: this family cannot be quantized"
        )


def run(options: QuantizeOptions, log: Log = print) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    source = resolve_model_dir(options.model)
    upload_to = options.output if options.output.startswith("s3://") else None
    if upload_to is not None:  # written to a staging directory, uploaded when done (manifest last)
        from lmforge.runtime.storage import staging

        out_dir = staging.staging_dir(upload_to)
    else:
        out_dir = Path(options.output.removeprefix("hostPath://"))
    if out_dir.resolve() == source.resolve():
        raise QuantizeError("--output must differ from --model")
    hf_config = json.loads((source / "config.json").read_text())
    if hf_config.get("quantization_config"):
        raise QuantizeError(
            f"{source} is already quantized ({hf_config['quantization_config'].get('quant_method')})"
        )
    device = resolve_device(options.device)
    dtype = storage_dtype(options.dtype, hf_config)
    compute_dtype = torch.float32 if device.type == "cpu" else dtype
    torch.manual_seed(options.seed)

    tokenizer = AutoTokenizer.from_pretrained(source)
    data = load_text_data(
        tokenizer,
        calibration=options.calibration,
        samples=options.samples,
        seq_len=options.seq_len,
        eval_dataset=options.eval_dataset,
        eval_samples=options.eval_samples,
        eval_seq_len=options.eval_seq_len,
        log=log,
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=compute_dtype).to(device).eval()  # type: ignore[arg-type]  # transformers types its wrapped .to() as if self were the argument
    model.requires_grad_(False)
    refuse_conv1d(model, hf_config)
    ignore = options.ignore_list
    if experts.has_router(model):  # MoE routers stay in high precision (runtime/quantize/experts.py)
        ignore = [*ignore, experts.ROUTER_PATTERN]
    targets = target_linears(model, ignore, options.bits, options.effective_group_size)
    log(
        f"[lmforge.quantize] {options.method}: {len(targets)} Linear modules on {device} "
        f"(ignored: {', '.join(ignore)})"
    )

    reference = report.next_token_logprobs(model, data.evaluation, device) if options.eval else []
    scheme = make_scheme(options, dtype, log)
    quantized = scheme.quantize_model(model, targets, data.calibration, device)
    if options.method != "fp8":  # MoE experts: per expert, round to nearest (fp8 leaves them dense)
        quantized.update(
            experts.quantize_experts(
                model, source, options.bits, scheme.group_size, dtype, scheme.int_tensors
            )
        )
    kl = top1 = None
    positions = 0
    if options.eval:
        hooks = FP8.install_activation_quant(targets) if isinstance(scheme, FP8) else []
        kl, top1, positions = report.compare(
            reference, report.next_token_logprobs(model, data.evaluation, device)
        )
        for hook in hooks:
            hook.remove()

    state = model.state_dict()
    qconfig = quantization_config(options.method, scheme.group_size, ignore)
    checkpoint.write_checkpoint(
        source,
        out_dir,
        checkpoint.output_tensors(source, state, quantized, dtype),
        qconfig,
        str(dtype).removeprefix("torch."),
        log,
    )
    before, after = checkpoint.checkpoint_bytes(source), checkpoint.checkpoint_bytes(out_dir)
    result = {
        "method": options.method,
        "groupSize": scheme.group_size,
        "sizeBytesBefore": before,
        "sizeBytesAfter": after,
        "compression": round(before / after, 3) if after else None,
        "klDivergence": None if kl is None else round(kl, 6),
        "top1Agreement": None if top1 is None else round(top1, 4),
        "evalPositions": positions,
        "evalSource": data.eval_source if options.eval else None,
        "calibrationSamples": len(data.calibration),
        "quantizedModules": len(quantized),
        "ignore": ignore,
        "durationSeconds": round(time.monotonic() - started, 2),
        "outputPath": upload_to or str(out_dir),
    }
    report.write_report(out_dir, result)
    if upload_to is not None:
        staging.publish(out_dir, upload_to)
        log(f"[lmforge.quantize] uploaded {out_dir} to {upload_to}")
    return result
