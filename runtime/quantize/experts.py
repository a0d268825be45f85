"""MoE models in the quantizer: the experts are quantized per expert (RTN), the routers never.

transformers keeps a MoE layer's experts as stacked 3D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]), not as Linears, while the checkpoint on disk (and every serving engine) has one
Linear per expert and projection (`experts.<e>.w1|w3|w2` or `gate_proj|up_proj|down_proj`). So the
experts are found as those parameters, each expert's gate, up and down matrix is quantized on its own
(round to nearest, the method's bits and group size), the model keeps computing with the dequantized
values, and the tensors are keyed by the checkpoint's per-expert module names, which the writer then
emits as `<module>.weight_packed` / `weight_scale` / `weight_shape` in place of `<module>.weight`.

Routers (`gate`, `router`, Qwen2-MoE's `shared_expert_gate`, DBRX's `router.layer`) stay in high
precision: a rounded router picks other experts, which moves the output far more than its bytes save.
`ROUTER_PATTERN` joins the ignore list whenever the model has one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lmforge.runtime.quantize import checkpoint, rtn

ROUTER_PATTERN = r"re:.*\.(gate|router|router\.layer|shared_expert_gate)$"
_ROUTER = re.compile(ROUTER_PATTERN[3:])
_DISK_EXPERT = re.compile(
    r"^(?P<module>.*\.layers\.(?P<layer>\d+)\..*\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj))\.weight$"
)
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def has_router(model: nn.Module) -> bool:
    return any(_ROUTER.match(name) for name, _ in model.named_modules())


def stacked_experts(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> the module holding that layer's stacked experts (3D gate_up_proj and down_proj)."""
    found = {}
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            layer = _LAYER.search(f".{name}.")
            if layer is None:
                raise ValueError(f"stacked experts {name} are not inside a numbered layer")
            found[int(layer.group(1))] = module
    return found


def disk_expert_modules(source: Path) -> dict[tuple[int, int, str], str]:
    """(layer, expert, gate|up|down) -> the checkpoint's module name of that expert projection."""
    out = {}
    for name in checkpoint.tensor_names(source):
        m = _DISK_EXPERT.match(name)
        if m is not None:
            out[(int(m["layer"]), int(m["expert"]), _PART[m["proj"]])] = m["module"]
    return out


@torch.no_grad()
def quantize_experts(
    model: nn.Module,
    source: Path,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    int_tensors: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, dict[str, torch.Tensor]]:
    """RTN-quantizes every expert projection; returns {checkpoint module name: packed tensors}. The model's
    stacked parameters are overwritten with the dequantized values (the quality report sees them)."""
    layers = stacked_experts(model)
    if not layers:
        return {}
    names = disk_expert_modules(source)
    out = {}
    for layer, module in layers.items():
        gate_up, down = cast(nn.Parameter, module.gate_up_proj), cast(nn.Parameter, module.down_proj)
        inter = gate_up.shape[1] // 2
        for expert in range(gate_up.shape[0]):
            views = {"gate": gate_up[expert, :inter], "up": gate_up[expert, inter:], "down": down[expert]}
            for part, weight in views.items():
                key = (layer, expert, part)
                if key not in names:
                    raise ValueError(
                        f"layer {layer} expert {expert} {part}: no per-expert tensor in {source}"
                    )
                if (group_size > 0 and weight.shape[1] % group_size) or (weight.shape[1] * bits) % 32:
                    raise ValueError(
                        f"{names[key]}: input size {weight.shape[1]} is not a multiple of the group size {group_size}"
                    )
                q, scale = rtn.rtn_int(weight.detach(), bits, group_size, dtype)
                weight.copy_(rtn.dequantize_int(q, scale).to(weight.dtype))
                out[names[key]] = int_tensors(q, scale)
    return out
