"""Load an HF safetensors checkpoint (single file or sharded with an index) into our modules.

Each checkpoint tensor goes through its parameter's `weight_loader`; names are first renamed onto
our modules by the model's `hf_to_ours` (the family's table), then HF's separate q/k/v and gate/up
tensors are routed into the fused parameters by the model's `packed_modules_mapping`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lmforge.runtime.models.layers import default_weight_loader

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints store RoPE tables; we rebuild them


def safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    rename = getattr(model, "hf_to_ours", None)  # the family's checkpoint -> module name renames
    loaded: set[str] = set()
    for hf_name, tensor in iter_checkpoint(model_dir):
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        name = rename(hf_name) if rename is not None else hf_name
        if name is None:
            continue  # the family says: not a weight (e.g. GPT-2's causal-mask buffers)
        if name == "lm_head.weight" and "lm_head.weight" not in params:
            continue  # tied embeddings: some checkpoints still carry a copy
        for hf_part, (fused, shard_id) in packed.items():
            if f".{hf_part}." in name:
                target = name.replace(f".{hf_part}.", f".{fused}.")
                fused_param = params[_known(target, params, hf_name)]
                fused_param.weight_loader(fused_param, tensor, shard_id)  # type: ignore[attr-defined]  # set by the fused module
                loaded.add(target)
                break
        else:
            param = params[_known(name, params, hf_name)]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {', '.join(missing[:8])}")


def _known(target: str, params: dict[str, nn.Parameter], source: str) -> str:
    if target not in params:
        raise ValueError(f"checkpoint tensor {source!r} has no matching parameter in the model")
    return target
