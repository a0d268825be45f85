"""LoRA on top of the base model's linears, without editing them: `wrap_lora_targets` replaces each
decoder-layer linear (dense, fused q/k/v or gate/up, W4A16/W8A16/FP8) by a `LoRALinear` holding the
base module and the device slot pool's A/B stacks for it.

    y = base(x)                                     the unchanged (possibly dequantizing) GEMM
    buf = shrink(x, A_stack, token_slots)           [T, shards * R], one launch for every shard
    y[:, shard] += scale * buf_shard @ B_shard^T    one expand launch per shard (q, k, v / gate, up)

A fused module holds one A/B pair per HF module it stacks (q_proj, k_proj, v_proj -> qkv_proj): the
shards an adapter does not target stay zero. The per-token slot index and the per-slot scales live in
one `LoRAContext` shared by every wrapper, set by the model runner before each forward; a batch without
adapter tokens skips the LoRA path entirely (and so do captured CUDA graphs, which only serve such
batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.kernels.backend import Ops


class LoRAContext:
    """What every LoRALinear reads in a forward: token_slots [T] int32 (a slot, -1: base model),
    scales [K] fp32 (per slot), and `active` (False: no token of this batch has an adapter)."""

    def __init__(self, num_slots: int, device: torch.device, ops: Ops):
        self.ops = ops
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.token_slots = torch.full((0,), -1, dtype=torch.int32, device=device)
        self.active = False


class LoRALinear(nn.Module):
    """base: the wrapped linear; shards: (first output row, rows) per stacked HF module, in order."""

    def __init__(self, base: nn.Module, in_features: int, shards: list[tuple[int, int]], ctx: LoRAContext,
                 num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):  # fmt: skip
        super().__init__()
        self.base, self.ctx, self.shards, self.max_rank = base, ctx, shards, max_rank
        self.in_features = in_features
        # plain attributes, not buffers: allocated on the device here, never in a state dict
        self.lora_a = torch.zeros(num_slots, len(shards) * max_rank, in_features, dtype=dtype, device=device)
        self.lora_b: list[torch.Tensor] = [
            torch.zeros(num_slots, size, max_rank, dtype=dtype, device=device) for _, size in shards
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if not ctx.active:
            return y
        buf = ctx.ops.lora_shrink(x, self.lora_a, ctx.token_slots)  # [T, shards * R]
        r = self.max_rank
        for i, (offset, size) in enumerate(self.shards):
            ctx.ops.lora_expand(y[:, offset : offset + size], buf[:, i * r : (i + 1) * r], self.lora_b[i],
                                ctx.token_slots, ctx.scales)  # fmt: skip
        return y

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        for b in self.lora_b:
            b[slot].zero_()

    def set_shard(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [r, in], b [rows, r] of one HF module into `slot` (ranks below R stay zero-padded)."""
        rank, r = a.shape[0], self.max_rank
        self.lora_a[slot, shard * r : shard * r + rank].copy_(a)
        self.lora_b[shard][slot, :, :rank].copy_(b)

    def extra_repr(self) -> str:
        return f"shards={self.shards}, max_rank={self.max_rank}, slots={self.lora_a.shape[0]}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one HF module's A/B go: the wrapper and the shard index inside it."""

    layer: LoRALinear
    shard: int
    in_features: int
    out_features: int


def _shards_of(module: nn.Module) -> dict[Any, tuple[int, int]] | None:
    """shard id -> (first row, rows) of a linear (fused or not, dense or quantized); None: not a linear."""
    from lmforge.runtime.models.quant import _shards

    shards = getattr(module, "shards", None)
    if isinstance(shards, dict) and hasattr(module, "in_features"):  # QuantLinear / Fp8Linear
        return dict(shards)
    if isinstance(module, nn.Linear):
        return _shards(module)
    return None


def wrap_lora_targets(
    model: nn.Module,
    ctx: LoRAContext,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Target]:
    """Wraps every linear inside the decoder layers; returns HF module name -> Target (what adapter
    tensors name). Call after the base weights are loaded (parameter names change under the wrapper)."""
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    to_hf = getattr(model, "ours_to_hf", lambda n: n)
    targets: dict[str, Target] = {}
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}" or isinstance(module, LoRALinear):
            continue
        shards = _shards_of(module)
        if shards is None:
            continue
        parent, _, leaf = name.rpartition(".")
        # HF modules stacked into this one: (hf leaf, shard id) in output-row order
        stacked = sorted(((hf, sid) for hf, (fused, sid) in packed.items() if fused == leaf and sid in shards),
                         key=lambda p: shards[p[1]][0])  # fmt: skip
        rows = [shards[sid] for _, sid in stacked]
        if not stacked:
            if any(fused == leaf for fused, _ in packed.values()):
                continue  # GPT-NeoX's per-head fused qkv: its HF rows are interleaved, not a LoRA target
            out_features = sum(size for _, size in shards.values())
            stacked, rows = [(leaf, None)], [(0, out_features)]  # one HF module (fused in HF too: Phi-3)
        layer = LoRALinear(module, module.in_features, rows, ctx, num_slots, max_rank, dtype, device)
        setattr(model.get_submodule(parent), leaf, layer)
        for i, (hf_leaf, _) in enumerate(stacked):
            hf_name = to_hf(f"{parent}.{hf_leaf}.weight")[: -len(".weight")]
            targets[hf_name] = Target(layer, i, module.in_features, rows[i][1])
    return targets
