"""Building blocks of the decoder families: norms, activations, RoPE, fused linears with weight loaders,
paged attention.

Norms, RoPE and the MLP activation call the kernel backend (`lmforge.kernels.backend.Ops`: the torch
references on CPU, the fused Triton kernels on CUDA), chosen once by the model runner.

Fused parameters carry a `weight_loader(param, loaded, shard_id)` so the checkpoint loader can
write HF's separate q/k/v (gate/up) tensors into one matrix; T = tokens in the flattened batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import reference, rope_cache
from lmforge.kernels.backend import Ops
from lmforge.runtime.models.attention_backend import AttentionBackend


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


class RMSNorm(nn.Module):
    """RMSNorm through the kernel backend; given the residual stream it fuses the add (vLLM style):
    `norm(x, residual)` returns (rms_norm(x + residual), x + residual), one pass over both."""

    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)  # [T, dim]
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)  # ([T, dim], [T, dim])


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x * (1 + w), the weight stored as an offset from one (HF's init is zeros).
    Torch reference only: the Triton rms_norm kernel scales by w."""

    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is None:
            return reference.gemma_rms_norm(x, self.weight, self.eps)
        residual = x + residual
        return reference.gemma_rms_norm(residual, self.weight, self.eps), residual


class LayerNorm(nn.Module):
    """LayerNorm with the residual interface of RMSNorm. bias=False: Cohere; affine=False: OLMo's
    non-parametric norm (no weight, no bias: nothing to load)."""

    def __init__(self, dim: int, eps: float, *, bias: bool = True, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics like transformers' OLMo/Cohere norms; nn.LayerNorm on fp32 inputs is the same op
        out = F.layer_norm(
            x.float(),
            (self.dim,),
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            self.eps,
        )
        return out.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, ops: Ops) -> nn.Module:
    """ModelConfig.norm -> module: rms | rms_1p | layer | layer_no_bias | layer_no_affine."""
    if kind == "rms":
        return RMSNorm(dim, eps, ops)
    if kind == "rms_1p":
        return GemmaRMSNorm(dim, eps, ops)
    if kind == "layer":
        return LayerNorm(dim, eps)
    if kind == "layer_no_bias":
        return LayerNorm(dim, eps, bias=False)
    if kind == "layer_no_affine":
        return LayerNorm(dim, eps, affine=False)
    raise ValueError(f"unknown norm kind {kind!r}")


def act_and_mul(x: torch.Tensor, act: str, ops: Ops) -> torch.Tensor:
    """[T, 2I] -> [T, I]: act(gate) * up. SiLU through the kernel backend (fused on CUDA), the other
    activations through their torch reference."""
    return ops.silu_and_mul(x) if act == "silu" else reference.act_and_mul(x, act)


class RotaryEmbedding(nn.Module):
    """RoPE on q and k in place, for every rope type of `lmforge.kernels.rope_cache` (tables equal to
    transformers'), partial rotary (the first rotary_dim dims rotate, the rest pass through) and both
    layouts (neox rotate_half, or interleaved pairs (2i, 2i+1) with is_neox_style=False: GLM, GPT-J, Cohere).

    head_dim: q/k head size; max_positions: the served context (table rows); theta: rope_theta;
    scaling: ModelConfig.rope_scaling (rope_type + its keys; None: plain RoPE); rotary_dim: rotated dims
    (default head_dim * scaling's partial_rotary_factor, else head_dim); max_position_embeddings: the HF
    config's, needed by dynamic (its threshold) and by yarn/longrope configs without factor or
    original_max_position_embeddings. Unknown rope types, keys or values raise ValueError at construction.

    Sequence-length-dependent types (longrope, dynamic) rotate a token by the length HF's forward saw
    (`rope_cache.hf_seq_lens`): forward then needs `prompt_lens`, unless max_positions never exceeds the
    threshold (then every sequence is "short" and position alone decides). Everything stays on the device
    with static shapes (CUDA-graph safe): longrope picks a row of a [2P, R] table, dynamic gathers its
    inverse frequencies by sequence length and builds cos/sin per token.
    """

    # registered buffers (register_buffer), declared for the type checker
    cos_sin_cache: torch.Tensor
    inv_freq_table: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None, ops: Ops,
                 *, rotary_dim: int | None = None, is_neox_style: bool = True,
                 max_position_embeddings: int | None = None):  # fmt: skip
        super().__init__()
        self.ops, self.is_neox_style, self.max_positions = ops, is_neox_style, max_positions
        spec = rope_cache.validate_rope_scaling(scaling, max_position_embeddings)
        self.rope_type = spec["rope_type"]
        self.rotary_dim = rotary_dim_of(head_dim, rotary_dim, spec)
        if spec.get("rope_theta") is not None and float(spec["rope_theta"]) != float(theta):
            raise ValueError(f"rope_scaling rope_theta={spec['rope_theta']!r} differs from theta={theta!r}")
        # rows [P, R] fp32 (cos half | sin half); longrope: [2P, R] short rows then long rows
        self.threshold: int | None = None  # HF sequence length above which the rotation changes
        if self.rope_type == "longrope":
            self.threshold = spec["original_max_position_embeddings"]
            cache = rope_cache.build_longrope_cache(self.rotary_dim, max_positions, theta, spec)
        elif self.rope_type == "dynamic":
            self.threshold = spec["original_max_position_embeddings"]
            self.register_buffer(
                "inv_freq_table",
                rope_cache.dynamic_inv_freq_table(
                    self.rotary_dim, theta, spec["factor"], self.threshold, max_positions
                ),
                persistent=False,
            )
            init_inv_freq = rope_cache.compute_inv_freq(self.rotary_dim, theta, spec,
                                                        max_position_embeddings=self.threshold)  # fmt: skip
            cache = rope_cache.cos_sin(torch.arange(max_positions, device="cpu"), init_inv_freq).to(
                rope_cache.target_device(None)
            )  # the table while no sequence passes the threshold
        else:
            cache = rope_cache.build_rope_cache(self.rotary_dim, max_positions, theta, spec)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.needs_prompt_lens = self.threshold is not None and max_positions > self.threshold

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                prompt_lens: torch.Tensor | None = None) -> None:  # fmt: skip
        """positions [T]; q [T, H, D], k [T, Hkv, D] (views into the fused qkv output), rotated in place.

        prompt_lens [T] int (optional): the prompt length of each token's sequence. Read only by longrope
        and dynamic when max_positions exceeds their threshold (`needs_prompt_lens`); ValueError if missing then.
        """
        rows, table = self.lookup(positions, prompt_lens)
        self.ops.rope(rows, q, k, table, self.is_neox_style)

    def lookup(self, positions: torch.Tensor, prompt_lens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(rows [T], table [N, R] fp32): token t rotates by table[rows[t]] (cos half | sin half)."""
        if not self.needs_prompt_lens:
            return positions, self.cos_sin_cache
        if prompt_lens is None:
            raise ValueError(f"rope_type {self.rope_type!r} with a served context of {self.max_positions} > "
                             f"{self.threshold} positions rotates by the sequence length HF saw: "
                             "RotaryEmbedding.forward needs prompt_lens (per token)")  # fmt: skip
        assert self.threshold is not None  # needs_prompt_lens implies a threshold
        if self.rope_type == "longrope":
            return rope_cache.longrope_rows(positions, prompt_lens, self.max_positions, self.threshold), \
                self.cos_sin_cache  # fmt: skip
        seq_lens = rope_cache.hf_seq_lens(positions, prompt_lens)  # dynamic: [T]
        per_token = rope_cache.cos_sin(positions, self.inv_freq_table[seq_lens - 1])  # [T, R]
        return torch.arange(positions.shape[0], device=positions.device), per_token


def rope_block_salt(model: nn.Module) -> Callable[[int, int, int], tuple[int, ...]] | None:
    """The prefix cache's extra block key for a model whose rotations depend on the sequence length:
    (start, end, prompt_len) -> one `rope_cache.block_rope_key` per such RotaryEmbedding; None when every
    rotary of the model rotates by position alone (block hashes stay plain token hashes)."""
    rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding) and m.needs_prompt_lens]
    if not rotaries:
        return None
    keys = [(m.rope_type, m.threshold) for m in dict.fromkeys(rotaries)]

    def salt(start: int, end: int, prompt_len: int) -> tuple[int, ...]:
        return tuple(
            rope_cache.block_rope_key(t, th, start, end, prompt_len) for t, th in keys if th is not None
        )

    return salt


def rotary_dim_of(head_dim: int, rotary_dim: int | None, scaling: dict[str, Any] | None) -> int:
    """The rotated dims: rotary_dim if given, else int(head_dim * partial_rotary_factor) as HF computes it;
    both given must agree. Odd or out-of-range values raise ValueError naming them."""
    factor = (scaling or {}).get("partial_rotary_factor")
    from_factor = None if factor is None else int(head_dim * factor)
    if rotary_dim is None:
        rotary_dim = head_dim if from_factor is None else from_factor
    elif from_factor is not None and from_factor != rotary_dim:
        raise ValueError(f"rotary_dim={rotary_dim} disagrees with partial_rotary_factor={factor!r} "
                         f"(head_dim {head_dim} -> {from_factor})")  # fmt: skip
    if rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    return rotary_dim


class QKVLinear(nn.Linear):
    """q, k and v projections in one matmul: out = [q (H*D) | k (Hkv*D) | v (Hkv*D)].

    Shards: "q"/"k"/"v" (Llama's separate projections); None: the whole fused matrix (Phi-3's
    qkv_proj); "per_head": GPT-NeoX's query_key_value, whose rows are [H, (q|k|v), D]."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool):
        self.sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        self.num_heads, self.head_dim = num_heads, head_dim
        super().__init__(hidden, sum(self.sizes.values()), bias=bias)
        for p in self.parameters():
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # vLLM-style: parameters carry their loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            return default_weight_loader(param, loaded)
        if shard_id == "per_head":  # [H*3*D, ...] -> [3*H*D, ...]
            rows = loaded.reshape(self.num_heads, 3, self.head_dim, *loaded.shape[1:]).transpose(0, 1)
            return default_weight_loader(param, rows.reshape(loaded.shape))
        offset = {"q": 0, "k": self.sizes["q"], "v": self.sizes["q"] + self.sizes["k"]}[shard_id]
        default_weight_loader(param.data.narrow(0, offset, self.sizes[shard_id]), loaded)


class MergedLinear(nn.Linear):
    """Several projections of the same input stacked on the output dim (gate_up = [gate | up])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias=bias)
        for p in self.parameters():
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # vLLM-style: parameters carry their loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:  # already fused in the checkpoint (Phi-3, GLM gate_up_proj)
            return default_weight_loader(param, loaded)
        offset = sum(self.out_sizes[:shard_id])
        default_weight_loader(param.data.narrow(0, offset, self.out_sizes[shard_id]), loaded)


class PagedAttention(nn.Module):
    """Holds one layer's slice of the KV cache (bound by the model runner) and calls the backend.

    The layer's own attention math travels with it (each defaults to plain causal Llama attention):
        scale            softmax scale; None: head_dim ** -0.5 (Gemma2: query_pre_attn_scalar ** -0.5)
        sliding_window   query i sees keys i - window < j <= i (Mistral, Gemma2/3 local layers, Qwen2 upper layers)
        alibi_slopes     [num_heads] per-head slopes, bias slope * (j - i) (BLOOM, MPT, Falcon-alibi);
                         see `lmforge.kernels.alibi.alibi_slopes`
        logits_soft_cap  scores -> cap * tanh(scores / cap) before masking (Gemma2 attn_logit_softcapping)
    The block manager reads `sliding_window` of every layer to free blocks no layer can see any more.
    """

    alibi_slopes: torch.Tensor | None  # a registered buffer

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: AttentionBackend,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
        logits_soft_cap: float | None = None,
    ):
        super().__init__()
        if scale is not None and not scale > 0:
            raise ValueError(f"PagedAttention: scale must be positive, got {scale}")
        if sliding_window is not None and (
            isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
        ):
            raise ValueError(
                f"PagedAttention: sliding_window must be a positive int or None, got {sliding_window!r}"
            )
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(
                f"PagedAttention: logits_soft_cap must be positive or None, got {logits_soft_cap}"
            )
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(
                f"PagedAttention: alibi_slopes must have shape ({num_heads},), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.sliding_window = sliding_window
        self.logits_soft_cap = float(logits_soft_cap) if logits_soft_cap is not None else None
        slopes = None if alibi_slopes is None else alibi_slopes.detach().to(torch.float32).contiguous()
        self.register_buffer(
            "alibi_slopes", slopes, persistent=False
        )  # follows the model's device; fp32 always
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D] once bound
        # int8 KV cache only: per-(token, head) fp32 scales [num_blocks, block_size, Hkv]; None otherwise
        self.k_scale_cache: torch.Tensor | None = None
        self.v_scale_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        # q [T, H, D]; k, v [T, Hkv, D] -> [T, H, D]
        return self.backend.forward(
            q,
            k,
            v,
            self.k_cache,
            self.v_cache,
            attn_meta,
            self.scale,
            k_scale_cache=self.k_scale_cache,
            v_scale_cache=self.v_scale_cache,
            sliding_window=self.sliding_window,
            alibi_slopes=self.alibi_slopes,
            logits_soft_cap=self.logits_soft_cap,
        )
