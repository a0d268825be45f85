"""Quantized Linears for compressed-tensors checkpoints (what `lmforge quantize` writes; llm-compressor's
W4A16 / W8A16 `pack-quantized` and FP8 `float-quantized` / `naive-quantized` too).

`apply_quantization(model, model_dir)` is the loader hook: when config.json has a compressed-tensors
`quantization_config`, every targeted, non-ignored nn.Linear of our model (fused qkv_proj / gate_up_proj
included: their HF shards must share one scheme) is swapped for a QuantLinear or an Fp8Linear before
the weights load. Their parameters carry `weight_loader`s, so `loader.load_weights` fills them from
`<module>.weight_packed` / `weight_scale` / `weight_shape` (or fp8 `weight` / `weight_scale`) with the
same routing of q/k/v and gate/up shards into stacked output rows as for dense weights.

    QuantLinear   weight_packed [N, K*bits/32] int32, weight_scale [N, K/group] (model dtype),
                  y = ops.quant_linear(x, ...)  (Triton W4A16/W8A16 GEMM on CUDA, torch dequant on CPU)
    Fp8Linear     weight [N, K] float8_e4m3fn, weight_scale [N, 1]; dynamic per-token fp8 activations when
                  the config asks for them; computed by dequantizing (emulation, any device)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.backend import Ops
from lmforge.runtime.models.layers import MergedLinear, QKVLinear, default_weight_loader

SUPPORTED_FORMATS = ("pack-quantized", "float-quantized", "naive-quantized")


@dataclass(frozen=True, slots=True)
class WeightScheme:
    """One config group's weights (+ whether activations are fp8 per token, dynamic)."""

    bits: int
    type: str  # "int" | "float"
    group_size: int  # -1: per output channel
    format: str
    fp8_activations: bool = False

    @classmethod
    def from_group(cls, group: dict[str, Any], default_format: str) -> WeightScheme:
        weights = group.get("weights") or {}
        fmt = group.get("format") or default_format
        if fmt not in SUPPORTED_FORMATS:
            raise ValueError(
                f"compressed-tensors format {fmt!r} is not supported; supported: {SUPPORTED_FORMATS}"
            )
        if not weights.get("symmetric", True) or weights.get("actorder") == "group":
            raise ValueError(
                "asymmetric weights (zero points) and actorder 'group' (g_idx) are not supported"
            )
        strategy = weights.get("strategy")
        group_size = int(weights["group_size"]) if strategy == "group" else -1
        activations = group.get("input_activations")
        fp8_act = bool(activations and activations.get("type") == "float" and activations.get("dynamic"))
        scheme = cls(
            bits=int(weights.get("num_bits", 0)),
            type=weights.get("type", "int"),
            group_size=group_size,
            format=fmt,
            fp8_activations=fp8_act,
        )
        if scheme.type == "int" and (fmt != "pack-quantized" or scheme.bits not in (4, 8)):
            raise ValueError(
                f"int{scheme.bits} weights in format {fmt!r}: only pack-quantized int4/int8 are supported"
            )
        if scheme.type == "float" and scheme.bits != 8:
            raise ValueError(f"float{scheme.bits} weights are not supported (only fp8 e4m3)")
        if activations and not fp8_act:
            raise ValueError(f"input activation quantization {activations} is not supported")
        return scheme


def load_quantization_config(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not config:
        return None
    if config.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"quantization method {config.get('quant_method')!r} is not supported "
            "(only compressed-tensors checkpoints, e.g. from `lmforge quantize`)"
        )
    if config.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"quantization_status {config['quantization_status']!r}: expected 'compressed'")
    return config


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors matching: exact name, re:<regex> (re.match) or a class name in the MRO."""
    classes = {cls.__name__ for cls in type(module).__mro__}
    return any(
        re.match(p[3:], name) if p.startswith("re:") else (p == name or p in classes) for p in patterns
    )


def scheme_for(name: str, module: nn.Module, config: dict[str, Any]) -> WeightScheme | None:
    """The scheme of the HF module `name` (None: left in high precision)."""
    if _matches(name, module, list(config.get("ignore") or [])):
        return None
    for group in (config.get("config_groups") or {}).values():
        if _matches(name, module, list(group.get("targets") or [])):
            return WeightScheme.from_group(group, config.get("format", "pack-quantized"))
    return None


def _shards(module: nn.Linear) -> dict[Any, tuple[int, int]]:
    """shard id -> (first output row, rows) of a fused linear; {None: whole} for a plain one."""
    sizes: list[tuple[Any, int]]
    if isinstance(module, QKVLinear):
        sizes = list(module.sizes.items())
    elif isinstance(module, MergedLinear):
        sizes = list(enumerate(module.out_sizes))
    else:
        return {None: (0, module.out_features)}
    out, offset = {}, 0
    for shard_id, size in sizes:
        out[shard_id] = (offset, size)
        offset += size
    return out


class _ShardedParams(nn.Module):
    """Output-row-stacked parameters with a shard-aware `weight_loader` (row slices of each shard)."""

    def __init__(self, shards: dict[Any, tuple[int, int]], in_features: int, head_dim: int | None = None):
        super().__init__()
        self.shards, self.in_features, self.head_dim = shards, in_features, head_dim
        self.out_features = sum(size for _, size in shards.values())

    def _register(self) -> None:
        for p in self.parameters(recurse=False):
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # vLLM-style: parameters carry their loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        """shard_id: a shard of a fused module (q/k/v, gate/up); None: the whole stack (already fused in
        the checkpoint: Phi-3 qkv_proj, GLM gate_up_proj); "per_head": GPT-NeoX's [H, (q|k|v), D] rows."""
        whole = shard_id not in self.shards
        if whole and shard_id not in (None, "per_head"):
            raise ValueError(f"unknown shard {shard_id!r} for a fused quantized linear ({list(self.shards)})")
        offset, size = (0, self.out_features) if whole else self.shards[shard_id]
        if param is getattr(self, "weight_shape", None):
            if tuple(loaded.tolist()) != (size, self.in_features):
                raise ValueError(
                    f"weight_shape {loaded.tolist()} does not match the model: {[size, self.in_features]}"
                )
            return
        if shard_id == "per_head":  # rows [H*3*D] -> [3*H*D], as QKVLinear does for dense weights
            assert self.head_dim is not None  # quantize_model copies it from the QKVLinear
            num_heads = self.shards["q"][1] // self.head_dim
            loaded = (
                loaded.reshape(num_heads, 3, self.head_dim, *loaded.shape[1:])
                .transpose(0, 1)
                .reshape(loaded.shape)
            )
        default_weight_loader(param.data.narrow(0, offset, size), loaded)


class QuantLinear(_ShardedParams):
    """W4A16 / W8A16 on compressed-tensors pack-quantized weights (symmetric, per channel or group)."""

    def __init__(
        self, shards: dict[Any, tuple[int, int]], in_features: int, bits: int, group_size: int, bias: bool
    ):
        super().__init__(shards, in_features)
        group = in_features if group_size <= 0 else group_size
        if in_features % group or (in_features * bits) % 32:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
        self.bits, self.group_size = bits, group_size  # group_size <= 0: per output channel
        n, k = self.out_features, in_features
        self.weight_packed = nn.Parameter(
            torch.zeros(n, k * bits // 32, dtype=torch.int32), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.ones(n, k // group), requires_grad=False)
        self.weight_shape = nn.Parameter(torch.tensor([n, k], dtype=torch.int64), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n), requires_grad=False) if bias else None
        self._register()
        self._ops: Ops | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self._ops is None:
            from lmforge.kernels.backend import get_ops

            self._ops = get_ops(x.device)
        return self._ops.quant_linear(
            x.contiguous(), self.weight_packed, self.weight_scale, self.bits, self.bias
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.weight_scale.shape[1]}"


class Fp8Linear(_ShardedParams):
    """FP8 e4m3 weights, per-output-channel scale; x fake-quantized per token when dynamic activations."""

    def __init__(
        self, shards: dict[Any, tuple[int, int]], in_features: int, bias: bool, fp8_activations: bool
    ):
        super().__init__(shards, in_features)
        n = self.out_features
        self.weight = nn.Parameter(
            torch.zeros(n, in_features, dtype=torch.float8_e4m3fn), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.ones(n, 1), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n), requires_grad=False) if bias else None
        self.fp8_activations = fp8_activations
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_activations:
            from lmforge.runtime.quantize.rtn import fake_quant_fp8_tokens

            x = fake_quant_fp8_tokens(x)
        weight = self.weight.to(self.weight_scale.dtype) * self.weight_scale
        return F.linear(x, weight.to(x.dtype), self.bias)


def _hf_names(name: str, module: nn.Module, packed: dict[str, tuple[str, Any]]) -> list[str]:
    """Checkpoint names of our module: q_proj/k_proj/v_proj for qkv_proj etc."""
    parent, _, leaf = name.rpartition(".")
    parts = [hf for hf, (fused, _) in packed.items() if fused == leaf]
    return [f"{parent}.{hf}" if parent else hf for hf in parts] if parts else [name]


def apply_quantization(model: nn.Module, model_dir: str | Path) -> dict[str, Any] | None:
    """Swaps quantized Linears into `model` (call inside the device/dtype context the model was built in).
    Returns the quantization_config, or None for a dense checkpoint (model untouched)."""
    config = load_quantization_config(model_dir)
    if config is None:
        return None
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        to_hf = getattr(model, "ours_to_hf", None)  # the family's renames, reversed (lm_head <- embed_out)
        names = [to_hf(n) if to_hf else n for n in _hf_names(name, module, packed)]
        schemes = {scheme_for(hf, module, config) for hf in names}
        if len(schemes) > 1:
            raise ValueError(f"{', '.join(names)} are fused into {name} but quantized differently")
        scheme = schemes.pop()
        if scheme is None:
            continue
        if name == "lm_head":
            raise ValueError("a quantized lm_head is not supported: keep lm_head in the ignore list")
        shards = _shards(module)
        bias = module.bias is not None
        if scheme.type == "float":
            new: _ShardedParams = Fp8Linear(shards, module.in_features, bias, scheme.fp8_activations)
        else:
            try:
                new = QuantLinear(shards, module.in_features, scheme.bits, scheme.group_size, bias)
            except ValueError as exc:  # e.g. a tensor-parallel shard that splits a scale group
                raise ValueError(
                    f"{name} ({module.out_features}x{module.in_features} on this rank): {exc}"
                ) from exc
        new.head_dim = getattr(module, "head_dim", None)  # QKVLinear: for GPT-NeoX's per-head rows
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        swapped += 1
    swapped += _quantize_experts(model, model_dir, config)
    if not swapped:
        raise ValueError(f"{model_dir}: the quantization_config targets none of the model's Linear layers")
    return config


def _quantize_experts(model: nn.Module, model_dir: str | Path, config: dict[str, Any]) -> int:
    """MoE layers whose experts the checkpoint holds pack-quantized (`<prefix>.<e>.<proj>.weight_packed`,
    each expert projection a Linear to compressed-tensors) get QuantFusedMoE; dense experts stay."""
    from safetensors import safe_open

    from lmforge.runtime.models.loader import safetensors_files
    from lmforge.runtime.models.moe import FusedMoE, QuantFusedMoE

    moe_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedMoE)]
    if not moe_layers:
        return 0
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    to_hf = getattr(model, "ours_to_hf", None)
    swapped = 0
    for name, module in moe_layers:
        prefix = to_hf(name) if to_hf else name
        firsts = [
            f"{prefix}.0.{proj}"
            for proj in ("w1", "gate_proj")
            if f"{prefix}.0.{proj}.weight_packed" in names
        ]
        if not firsts:
            continue
        probe = nn.Linear(module.w13_weight.shape[2], module.intermediate, bias=False, device="meta")
        scheme = scheme_for(firsts[0], probe, config)
        if scheme is None or scheme.type != "int":
            raise ValueError(
                f"{firsts[0]}: packed expert weights, but the quantization_config gives them no int scheme"
            )
        new = QuantFusedMoE(module.num_experts, module.w13_weight.shape[2], module.intermediate, module.activation,
                            module.ops, scheme.bits, scheme.group_size, module.expert_start,
                            module.local_experts)  # fmt: skip
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, new)
        swapped += 1
    return swapped
