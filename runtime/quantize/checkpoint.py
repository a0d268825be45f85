"""Reading the source checkpoint's layout and writing the compressed-tensors one.

Output directory: config.json (the source's + `quantization_config`), *.safetensors with metadata
{"format": "pt"} (one file, or shards of at most SHARD_BYTES with model.safetensors.index.json), and
every other file of the source (tokenizer, generation config, chat template...) copied. Tensor names
are the source checkpoint's; a quantized Linear's `<module>.weight` becomes its scheme's tensors.
config.json is written last: a directory without it is an unfinished run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 5 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_COPIED = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "quantization_report.json",
}


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of the weight files (safetensors, else any *.bin/*.pt)."""
    files = weight_files(model_dir) or [p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files)


def tensor_names(model_dir: Path) -> list[str]:
    names: list[str] = []
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names += list(f.keys())
    return names


def read_tensor(model_dir: Path, name: str) -> torch.Tensor:
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                return f.get_tensor(name)
    raise KeyError(name)


def output_tensors(
    source: Path,
    state: dict[str, torch.Tensor],
    quantized: dict[str, dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output in the source's order. Unquantized floating tensors come from the
    model `state` (AWQ folds its scales into norms), cast to `dtype`; names the model does not know
    (buffers the loader skips) are copied from the source."""
    written: set[str] = set()
    for name in tensor_names(source):
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            for suffix, tensor in quantized[module].items():
                yield f"{module}.{suffix}", tensor
            written.add(module)
            continue
        tensor = state[name] if name in state else read_tensor(source, name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor.detach().cpu().contiguous()
    missing = sorted(set(quantized) - written)
    if missing:
        raise ValueError(
            f"quantized modules without a '<module>.weight' tensor in the source checkpoint: "
            f"{', '.join(missing[:5])} (renamed by the loader?)"
        )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_weights(
    out_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES
) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors:
        if sizes[-1] and sizes[-1] + _nbytes(tensor) > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += _nbytes(tensor)
    for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, out_dir: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name not in NOT_COPIED and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(path, out_dir / path.name)


def write_checkpoint(
    source: Path,
    out_dir: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    quantization_config: dict[str, Any],
    dtype_name: str,
    log: Callable[[str], None] = print,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)
    copy_side_files(source, out_dir)
    write_weights(out_dir, tensors)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log(f"[lmforge.quantize] wrote {out_dir}")
