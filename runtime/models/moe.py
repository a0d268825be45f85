"""The sparse MoE MLP of Mixtral, Qwen2-MoE, DeepSeek-V2/V3 and their kin: router, experts, shared expert.

    logits = gate(x)                              [T, E]   (DeepSeek: in fp32)
    weights, ids = route(logits, cfg)             [T, k]   (`route`: each family's top-k rule, pure)
    y = ops.fused_moe(x, w13, w2, weights, ids)   [T, H]   (kernels/fused_moe.py on CUDA, the loop on CPU)
    y += shared_expert(x) [* sigmoid(shared_expert_gate(x))]

All experts of a layer live in two stacked parameters, `experts.w13_weight` [E, 2I, H] (gate | up) and
`experts.w2_weight` [E, H, I]; `expert_target` routes a checkpoint's per-expert tensor names
(`experts.<e>.w1|w3|w2` or `gate_proj|up_proj|down_proj`) into their slice, so each expert's tensors are
read once from the safetensors file and copied straight into place (no transient [E, ...] copy).
Under tensor parallelism the experts split by expert (parallel.py): a rank's `FusedMoE` holds experts
[start, start + n) only (`expert_start`, the stacked parameters' first dim n), the router stays whole, the
rank passes `ids - start` to the op (ids outside [0, n) are dropped, see kernels/fused_moe.py), and one
all-reduce of the block's output sums the ranks' partial sums (the shared expert is column/row split
like the dense MLP and joins that same all-reduce).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmforge.runtime.models.config import ModelConfig, MoEConfig

# checkpoint names of one expert's projections -> (our stacked parameter, shard: 0 gate, 1 up, None down)
_EXPERT_NAME = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<kind>\w+)$"
)
_EXPERT_PROJ = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
                "w2": ("w2", None), "down_proj": ("w2", None)}  # fmt: skip


# DBRX keeps every expert of a layer in one tensor per projection: w1 (gate), v1 (up) [E*I, H], w2 [E*I, H]
_STACKED_NAME = re.compile(r"^(?P<prefix>.+\.experts)\.stacked_(?P<proj>w1|v1|w2)$")
_STACKED_PROJ = {"w1": ("w13", 0), "v1": ("w13", 1), "w2": ("w2", None)}


def expert_target(name: str) -> tuple[str, str, tuple[int | None, int | None]] | None:
    """'model.layers.3.mlp.experts.5.w3.weight' -> ('model.layers.3.mlp.experts', 'w13_weight', (5, 1));
    None for a name that is not a per-expert projection. `kind` (weight, weight_packed, weight_scale, ...)
    is kept: quantized experts stack their packed tensors the same way."""
    stacked_match = _STACKED_NAME.match(name)
    if stacked_match is not None:  # all experts at once (expert None)
        proj, half = _STACKED_PROJ[stacked_match["proj"]]
        return stacked_match["prefix"], f"{proj}_weight", (None, half)
    m = _EXPERT_NAME.match(name)
    if m is None:
        return None
    stacked, shard = _EXPERT_PROJ[m["proj"]]
    return m["prefix"], f"{stacked}_{m['kind']}", (int(m["expert"]), shard)


def route(logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Router logits [T, E] -> (weights [T, k] fp32 (Qwen2-MoE: the logits' dtype), expert ids [T, k]).
    Mirrors transformers' routers: softmax or sigmoid scores; grouped top-k; V3's correction bias
    shifts only the choice, never the weights."""
    if cfg.scoring == "sparsemixer":
        return sparsemixer(logits, cfg.jitter_eps)
    scores = logits.float().softmax(-1) if cfg.scoring == "softmax" else logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups is not None:
        assert cfg.topk_groups is not None
        grouped = choice.view(choice.shape[0], cfg.num_groups, -1)
        group_scores = (
            grouped.max(-1).values if cfg.group_score == "max" else grouped.topk(2, -1).values.sum(-1)
        )
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.topk_groups, -1).indices, 1.0)
        mask = keep.bool().unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        choice = choice.masked_fill(~mask, cfg.group_fill)
    ids = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + cfg.renorm_eps)
    weights = weights * cfg.routed_scaling
    if cfg.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return weights, ids


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's inference routing (transformers' `sparsemixer`, eval mode), in the logits' dtype: the
    best expert, weighted by a softmax over the experts whose logits are within 2 * jitter_eps (relative to
    max(|logit|, best)) of it; then the same for the best of the others."""
    weights, ids, masked = [], [], logits
    for _ in range(2):
        best, best_id = masked.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
        weights.append(masked.masked_fill(far, float("-inf")).softmax(-1).gather(-1, best_id))
        ids.append(best_id)
        masked = masked.scatter(-1, best_id, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


def local_expert(expert: int, start: int, count: int, num_experts: int) -> int | None:
    """A checkpoint's expert id -> its index in this rank's stacked parameters [start, start + count);
    None for another rank's expert. Refuses an id past the config's `num_experts`."""
    if not 0 <= expert < num_experts:
        raise ValueError(f"checkpoint has expert {expert}; the config says {num_experts} experts")
    local = expert - start
    return local if 0 <= local < count else None


class Router(nn.Module):
    """gate.weight [E, H] (+ DeepSeek-V3's `e_score_correction_bias` [E]); fp32 when the family keeps it so."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        dtype = torch.float32 if cfg.router_fp32 else None
        self.fp32 = cfg.router_fp32
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden, dtype=dtype))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))
            if cfg.score_correction_bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E]
        if self.fp32:
            return x.float() @ self.weight.float().t()
        return x @ self.weight.t()


class FusedMoE(nn.Module):
    """Every expert of one layer: w13_weight [E, 2I, H] (gate rows :I, up rows I:), w2_weight [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str, ops: Any,
                 expert_start: int = 0, local_experts: int = 0):  # fmt: skip
        super().__init__()
        self.num_experts, self.intermediate, self.activation, self.ops = (
            num_experts,
            intermediate,
            activation,
            ops,
        )
        self.expert_start, self.local_experts = expert_start, local_experts or num_experts
        n = self.local_experts
        self.w13_weight = nn.Parameter(torch.empty(n, 2 * intermediate, hidden))
        self.w2_weight = nn.Parameter(torch.empty(n, hidden, intermediate))
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int | None, int | None]
    ) -> None:
        """One expert's gate (shard 0), up (1) or down (None) matrix into its slice of the stacked parameter;
        expert None: every expert (of this rank) at once, DBRX's [E*I, H] tensors (its w2 holds down_proj
        transposed; the loader reads only this rank's rows). Another rank's expert is not copied."""
        expert, half = shard
        if expert is None:
            stacked = loaded.view(self.local_experts, self.intermediate, -1)  # [n, I, H]
            if param is self.w2_weight:
                param.data.copy_(stacked.transpose(1, 2))
            else:
                param.data.narrow(1, (half or 0) * self.intermediate, self.intermediate).copy_(stacked)
            return
        local = local_expert(expert, self.expert_start, self.local_experts, self.num_experts)
        if local is None:
            return
        target = param.data[local]
        if half is not None:
            target = target.narrow(0, half * self.intermediate, self.intermediate)
        if target.shape != loaded.shape:
            raise ValueError(
                f"expert {expert}: parameter slice {tuple(target.shape)} vs checkpoint {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids - self.expert_start if self.expert_start else ids  # another rank's experts: outside [0, n)
        return self.ops.fused_moe(x, self.w13_weight, self.w2_weight, weights, ids, self.activation)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ shared expert). The shared expert is a dense gated MLP (`mlp_factory(size)`)."""

    def __init__(self, cfg: ModelConfig, ops: Any, mlp_factory: Any):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.cfg = moe
        self.gate = Router(cfg.hidden_size, moe)
        self.experts = FusedMoE(moe.num_experts, cfg.hidden_size, moe.intermediate_size, cfg.hidden_act, ops,
                                moe.expert_start, moe.local_experts)  # fmt: skip
        self.shared_expert = (
            mlp_factory(moe.shared_intermediate_size) if moe.shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if moe.shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = route(self.gate(x), self.cfg, self.gate.e_score_correction_bias)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class QuantFusedMoE(nn.Module):
    """Experts of a W4A16 / W8A16 compressed-tensors checkpoint (`lmforge quantize` quantizes each expert
    projection as its own pack-quantized Linear): the packed codes and scales stacked like FusedMoE's
    weights, `w13_weight_packed` [E, 2I, H*bits/32] int32 + `w13_weight_scale` [E, 2I, H/group],
    `w2_weight_packed` [E, H, I*bits/32] + `w2_weight_scale` [E, H, I/group], through `ops.fused_moe_quant`:
    the same grouped GEMMs, each weight tile dequantized in registers after its load (Triton), or the
    experts dequantized and looped over (torch reference)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str, ops: Any,
                 bits: int, group_size: int, expert_start: int = 0, local_experts: int = 0):  # fmt: skip
        super().__init__()
        self.num_experts, self.intermediate, self.hidden = num_experts, intermediate, hidden
        self.expert_start, self.local_experts = expert_start, local_experts or num_experts
        self.activation, self.ops, self.bits = activation, ops, bits
        for k in (hidden, intermediate):
            group = k if group_size <= 0 else group_size
            if k % group or (k * bits) % 32:
                raise ValueError(f"expert input size {k} is not a multiple of the group size {group}")
        g_h = hidden if group_size <= 0 else group_size
        g_i = intermediate if group_size <= 0 else group_size
        frozen = dict(requires_grad=False)
        e, i, h = self.local_experts, intermediate, hidden
        self.w13_weight_packed = nn.Parameter(
            torch.zeros(e, 2 * i, h * bits // 32, dtype=torch.int32), **frozen
        )
        self.w13_weight_scale = nn.Parameter(torch.ones(e, 2 * i, h // g_h), **frozen)
        self.w2_weight_packed = nn.Parameter(torch.zeros(e, h, i * bits // 32, dtype=torch.int32), **frozen)
        self.w2_weight_scale = nn.Parameter(torch.ones(e, h, i // g_i), **frozen)
        # each expert projection's [out, in], as compressed-tensors stores it: checked, not kept
        self.w13_weight_shape = nn.Parameter(torch.tensor([i, h]), **frozen)
        self.w2_weight_shape = nn.Parameter(torch.tensor([h, i]), **frozen)
        for p in self.parameters():
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int | None, int | None]
    ) -> None:
        expert, half = shard
        if expert is None:
            raise ValueError(f"quantized experts are loaded one by one; got all {self.num_experts} at once")
        local = local_expert(expert, self.expert_start, self.local_experts, self.num_experts)
        if param is self.w13_weight_shape or param is self.w2_weight_shape:
            if loaded.tolist() != param.tolist():
                raise ValueError(
                    f"expert {expert}: weight_shape {loaded.tolist()} does not match the model {param.tolist()}"
                )
            return
        if local is None:
            return
        target = param.data[local]
        if half is not None:
            target = target.narrow(0, half * self.intermediate, self.intermediate)
        if target.shape != loaded.shape:
            raise ValueError(
                f"expert {expert}: parameter slice {tuple(target.shape)} vs checkpoint {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids - self.expert_start if self.expert_start else ids  # another rank's experts: outside [0, n)
        return self.ops.fused_moe_quant(x, self.w13_weight_packed, self.w13_weight_scale, self.w2_weight_packed,
                                        self.w2_weight_scale, self.bits, weights, ids, self.activation)  # fmt: skip
