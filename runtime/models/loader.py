"""Load an HF safetensors checkpoint (single file or sharded with an index) into our modules.

Each checkpoint tensor goes through its parameter's `weight_loader`; names are first renamed onto
our modules by the model's `hf_to_ours` (the family's table), then HF's separate q/k/v and gate/up
tensors are routed into the fused parameters by the model's `packed_modules_mapping`.

Under tensor parallelism (`tp` given) a rank reads only its slices: each tensor is opened lazily with
safetensors' `get_slice` and indexed by `parallel.shard_spec` before it reaches the weight_loader, so no
rank ever holds a full copy of a sharded weight in host memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from lmforge.runtime.models.layers import default_weight_loader
from lmforge.runtime.models.moe import local_expert
from lmforge.runtime.models.parallel import (
    ShardSpec,
    Slice,
    local_weight_shape,
    quant_columns,
    read_slices,
    shard_spec,
)

if TYPE_CHECKING:
    from lmforge.runtime.models.config import ModelConfig
    from lmforge.runtime.models.parallel import TPLayout

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


def iter_checkpoint_slices(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice): nothing is read until the slice is indexed (`parallel.read_slices`)."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_slice(name)


def load_weights(
    model: nn.Module, model_dir: str | Path, tp: tuple[TPLayout, ModelConfig] | None = None
) -> None:
    """tp: (this rank's layout, the full model config): read only the rank's slices."""
    params = dict(model.named_parameters())
    target = _WeightTarget(model, params, tp)
    rename = getattr(model, "hf_to_ours", None)  # the family's checkpoint -> module name renames
    loaded: set[str] = set()
    source = iter_checkpoint(model_dir) if tp is None else iter_checkpoint_slices(model_dir)
    for hf_name, tensor in source:
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        name = rename(hf_name) if rename is not None else hf_name
        if name is None:
            continue  # the family says: not a weight (e.g. GPT-2's causal-mask buffers)
        if name == "lm_head.weight" and "lm_head.weight" not in params:
            continue  # tied embeddings: some checkpoints still carry a copy
        loaded.add(target.load(name, tensor, hf_name))
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {', '.join(missing[:8])}")


class _WeightTarget:
    """Where one checkpoint tensor goes: an expert's slice of a stacked MoE parameter, a shard of a
    fused (packed) parameter, or a plain parameter; under tensor parallelism, only this rank's slice."""

    def __init__(
        self, model: nn.Module, params: dict[str, nn.Parameter], tp: tuple[TPLayout, ModelConfig] | None
    ):
        self.params, self.tp = params, tp
        self.modules = dict(model.named_modules())
        self.packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
        self.expert_target = getattr(model, "expert_target", None)  # MoE: per-expert tensors -> stacked

    def load(self, name: str, tensor: Any, hf_name: str) -> str:
        """Copies `tensor` (checkpoint name `hf_name`, our name `name`) in; returns the parameter filled."""
        params, tp = self.params, self.tp
        expert = self.expert_target(name) if self.expert_target is not None else None
        if expert is not None:  # one expert's matrix, copied straight into its slice
            stacked, shard = expert
            stacked_param = params[_known(stacked, params, hf_name)]
            if tp is not None:
                tensor = _rank_experts(tensor, shard, self.modules[stacked.rpartition(".")[0]], hf_name)
                if tensor is None:
                    return stacked  # another rank's expert: never read
            stacked_param.weight_loader(stacked_param, tensor, shard)  # type: ignore[attr-defined]  # FusedMoE's
            return stacked
        for hf_part, (fused, shard_id) in self.packed.items():
            if f".{hf_part}." in name:
                target = name.replace(f".{hf_part}.", f".{fused}.")
                fused_param = params[_known(target, params, hf_name)]
                if tp is not None:
                    tensor = _rank_slice(tensor, target, shard_id, tp, self.modules, hf_name)
                fused_param.weight_loader(fused_param, tensor, shard_id)  # type: ignore[attr-defined]  # set by the fused module
                return target
        param = params[_known(name, params, hf_name)]
        if tp is not None:
            tensor = _rank_slice(tensor, name, None, tp, self.modules, hf_name)
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return name


def _known(target: str, params: dict[str, nn.Parameter], source: str) -> str:
    if target not in params:
        raise ValueError(f"checkpoint tensor {source!r} has no matching parameter in the model")
    return target


def _rank_slice(
    handle: Any,
    name: str,
    shard_id: Any,
    tp: tuple[TPLayout, ModelConfig],
    modules: dict[str, nn.Module],
    source: str,
) -> Any:
    """This rank's part of checkpoint tensor `source` (our parameter `name`)."""
    layout, cfg = tp
    module_name, _, leaf = name.rpartition(".")
    if leaf == "weight_shape":  # quantized: the full [N, K] -> this rank's
        weight_leaf = "weight_packed" if hasattr(modules[module_name], "weight_packed") else "weight"
        spec = shard_spec(f"{module_name}.{weight_leaf}", shard_id, layout, cfg)  # in elements
        return local_weight_shape(handle[:], spec, source)
    spec = shard_spec(name, shard_id, layout, cfg)
    module = modules[module_name]
    if leaf in ("weight_packed", "weight_scale") and any(s.dim == 1 for s in spec.slices):
        spec = _quant_column_spec(spec, leaf, module, module_name)
    return read_slices(handle, spec, source)


def _rank_experts(handle: Any, shard: tuple[int | None, int | None], experts: Any, source: str) -> Any:
    """Expert parallelism (`experts`: a FusedMoE or QuantFusedMoE): one expert's tensor read whole when
    this rank holds that expert, None (nothing read) when another rank does; DBRX's all-experts [E*I, H]
    tensor: just this rank's experts' rows."""
    start, count, total = int(experts.expert_start), int(experts.local_experts), int(experts.num_experts)
    expert = shard[0]
    if expert is None:
        inter = int(experts.intermediate)
        return read_slices(
            handle, ShardSpec((Slice(0, start * inter, count * inter, total * inter),)), source
        )
    return handle[:] if local_expert(expert, start, count, total) is not None else None


def _quant_column_spec(spec: ShardSpec, leaf: str, module: nn.Module, layer: str) -> ShardSpec:
    """A row-parallel quantized layer: element columns -> packed int32 columns or scale groups; a
    per-output-channel scale (one column) is the same on every rank."""
    if leaf == "weight_packed":
        bits: Any = module.bits  # a QuantLinear's int attribute
        return quant_columns(spec, leaf, 32 // int(bits), layer)
    group = int(getattr(module, "group_size", -1))
    if group <= 0:  # per channel: [N, 1], every rank holds all N output rows
        return ShardSpec()
    return quant_columns(spec, leaf, group, layer)
