"""Tensor parallelism for the decoder families: which slice of every weight a rank holds, and the few
modules whose math changes when a layer is split across ranks (Megatron-LM's layout, as vLLM serves it).

    q/k/v, gate/up, up      column-parallel: rank r holds its heads' / its intermediate rows
    o_proj, down_proj       row-parallel: rank r holds the matching input columns; one all-reduce
                            after each (a forward hook, so that quantized and LoRA-wrapped Linears
                            keep their class); the bias is loaded on rank 0 only, so the sum adds it once
    embed_tokens, lm_head   vocab-parallel: rows [r * Vp, (r + 1) * Vp) of the vocabulary padded to
                            N * Vp; the embedding masks foreign ids and all-reduces, the logits are
                            gathered to [T, V] (padding dropped) by the model runner
    MoE experts             expert parallel: rank r holds experts [r * E / N, (r + 1) * E / N) (only those
                            are read); the router is replicated (every rank picks the same top-k), each
                            rank sums its experts' weighted outputs, and ONE all-reduce of the MoE block's
                            output adds the ranks' parts; a shared expert splits like the dense MLP (its
                            down_proj is not reduced on its own: its part joins that all-reduce)
    KV heads                split when num_kv_heads >= N, else each rank keeps the one KV head its
                            query heads read (replicated N / num_kv_heads times)

A rank's model is the ordinary graph built from `local_config` (the rank's head, intermediate and vocab
counts), so every shape in decoder.py is already the local one; `parallelize` then swaps in the modules
below, and the loader reads only the rank's slices (`shard_spec`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.runtime.models.config import ModelConfig


class TPGroup:
    """The collectives of one tensor-parallel group (torch.distributed's default group): the model's
    all-reduces and the vocab gather. `world_size` 1 makes every op the identity."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., world_size * n], rank order (the vocab shards' logits)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


# the config key that holds the expert count, by architecture (for refusals that name it)
_EXPERTS_KEY = {
    "Qwen2MoeForCausalLM": "num_experts",
    "DbrxForCausalLM": "ffn_config.moe_num_experts",
    "DeepseekV2ForCausalLM": "n_routed_experts",
    "DeepseekV3ForCausalLM": "n_routed_experts",
}


@dataclass(frozen=True, slots=True)
class TPLayout:
    """Rank `rank` of `size`: the heads, KV heads, intermediate rows and vocab rows it holds. Pure."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    shared_intermediate_size: int = 0  # a MoE's shared expert (the full model's; 0: none)

    @classmethod
    def for_config(cls, cfg: ModelConfig, rank: int, size: int) -> TPLayout:
        """Refuses, naming the config key and the sizes, a model that does not split into `size` ranks."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tensor parallel rank {rank} of {size} is out of range")
        problems = []
        if cfg.num_heads % size:
            problems.append(f"num_attention_heads={cfg.num_heads} is not divisible by it")
        if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
            problems.append(f"num_key_value_heads={cfg.num_kv_heads} neither divides by it nor divides it")
        if cfg.intermediate_size % size:
            problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by it")
        if cfg.moe is not None:
            if cfg.moe.num_experts % size:
                key = _EXPERTS_KEY.get(cfg.architecture, "num_local_experts")
                problems.append(f"{key}={cfg.moe.num_experts} is not divisible by it (experts split by rank)")
            if cfg.moe.shared_intermediate_size % size:
                problems.append(
                    f"shared_expert_intermediate_size={cfg.moe.shared_intermediate_size} is not divisible by it"
                )
        if problems:
            raise ValueError(
                f"{cfg.architecture} cannot be split over tensor_parallel_size={size}: " + "; ".join(problems)
            )
        shared = cfg.moe.shared_intermediate_size if cfg.moe is not None else 0
        return cls(
            rank,
            size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.head_dim,
            shared,
        )

    # --- counts on this rank ---
    @property
    def local_heads(self) -> int:
        return self.num_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless num_kv_heads < size)."""
        return max(1, self.size // self.num_kv_heads)

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.size

    @property
    def local_vocab(self) -> int:
        """Vp: the vocabulary rows per rank (the vocabulary padded to a multiple of size)."""
        return -(-self.vocab_size // self.size)

    # --- this rank's ranges (start, length) in the full model ---
    @property
    def head_start(self) -> int:
        return self.rank * self.local_heads

    @property
    def kv_head_start(self) -> int:
        if self.num_kv_heads >= self.size:
            return self.rank * self.local_kv_heads
        return self.rank * self.num_kv_heads // self.size  # the KV head this rank's query heads read

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab


def local_config(cfg: ModelConfig, layout: TPLayout) -> ModelConfig:
    """The config of one rank's model: its heads, KV heads, intermediate rows and (padded) vocab rows."""
    if layout.size == 1:
        return cfg
    moe = cfg.moe
    if moe is not None:  # the router keeps num_experts; the rank holds its E / N experts
        n = moe.num_experts // layout.size
        moe = dataclasses.replace(
            moe,
            expert_start=layout.rank * n,
            local_experts=n,
            shared_intermediate_size=moe.shared_intermediate_size // layout.size,
        )
    return dataclasses.replace(
        cfg,
        num_heads=layout.local_heads,
        num_kv_heads=layout.local_kv_heads,
        intermediate_size=layout.local_intermediate,
        vocab_size=layout.local_vocab,
        moe=moe,
    )


# --- checkpoint slices ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) [start, start + length) of a checkpoint tensor, in units of
    `unit` elements (a head's head_dim rows, a packed int32 column, a scale group). `full` is the size of
    that dim the model expects, checked against the checkpoint. pad: rows of zeros appended (vocab)."""

    dim: int
    start: int
    length: int
    full: int
    pad: int = 0


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """How a rank reads one checkpoint tensor: the concatenation of `slices` along their dim (one slice
    for most; q|k|v or gate|up for a tensor fused in the checkpoint), or the whole tensor (replicated)
    when `slices` is empty; `zero` loads zeros in its shape (a row-parallel bias on ranks > 0)."""

    slices: tuple[Slice, ...] = ()
    zero: bool = False

    @property
    def replicated(self) -> bool:
        return not self.slices and not self.zero


REPLICATED = ShardSpec()

_ROW = ("o_proj", "down_proj")


def _head_rows(layout: TPLayout) -> Slice:
    d = layout.head_dim
    return Slice(0, layout.head_start * d, layout.local_heads * d, layout.num_heads * d)


def _kv_rows(layout: TPLayout) -> Slice:
    d = layout.head_dim
    return Slice(0, layout.kv_head_start * d, layout.local_kv_heads * d, layout.num_kv_heads * d)


def _intermediate_rows(layout: TPLayout, full: int | None = None) -> Slice:
    """This rank's rows of an MLP's intermediate dim: `full` rows (a MoE's shared expert has its own
    size), intermediate_size when None."""
    full = layout.intermediate_size if full is None else full
    n = full // layout.size
    return Slice(0, layout.rank * n, n, full)


def _qkv_spec(shard_id: Any, layout: TPLayout) -> ShardSpec:
    d, q, kv = layout.head_dim, _head_rows(layout), _kv_rows(layout)
    if shard_id == "q":
        return ShardSpec((q,))
    if shard_id in ("k", "v"):
        return ShardSpec((kv,))
    if shard_id == "per_head":  # GPT-NeoX rows [H, (q|k|v), D]: this rank's heads, 3 * D rows each
        h = layout.local_heads
        return ShardSpec((Slice(0, layout.head_start * 3 * d, h * 3 * d, layout.num_heads * 3 * d),))
    # fused in the checkpoint (Phi-3): q | k | v rows, each sliced
    q_rows, kv_rows = layout.num_heads * d, layout.num_kv_heads * d
    full = q_rows + 2 * kv_rows
    return ShardSpec(
        (
            Slice(0, q.start, q.length, full),
            Slice(0, q_rows + kv.start, kv.length, full),
            Slice(0, q_rows + kv_rows + kv.start, kv.length, full),
        )
    )


def _gate_up_spec(shard_id: Any, layout: TPLayout, full: int | None) -> ShardSpec:
    inter = _intermediate_rows(layout, full)
    if shard_id is not None:
        return ShardSpec((inter,))
    i = inter.full  # gate | up fused in the checkpoint (Phi-3, GLM)
    return ShardSpec(
        (Slice(0, inter.start, inter.length, 2 * i), Slice(0, i + inter.start, inter.length, 2 * i))
    )


def _row_parallel_spec(kind: str, leaf: str, layout: TPLayout, full: int | None) -> ShardSpec:
    if leaf == "bias":  # added once: by rank 0, zeros elsewhere
        return REPLICATED if layout.rank == 0 else ShardSpec(zero=True)
    cols = _head_rows(layout) if kind == "o_proj" else _intermediate_rows(layout, full)
    return ShardSpec((dataclasses.replace(cols, dim=1),))


def _vocab_spec(layout: TPLayout) -> ShardSpec:
    vp, start = layout.local_vocab, layout.vocab_start
    length = max(0, min(vp, layout.vocab_size - start))
    return ShardSpec((Slice(0, start, length, layout.vocab_size, pad=vp - length),))


def _qk_norm_spec(kind: str, layout: TPLayout, qk_norm: str | None) -> ShardSpec:
    if qk_norm not in ("full", "head_layer_per_head"):
        return REPLICATED  # a norm over head_dim, the same for every head
    heads = _head_rows(layout) if kind == "q_norm" else _kv_rows(layout)
    if qk_norm == "head_layer_per_head":  # weight [H, D]: one row per head
        d = layout.head_dim
        heads = Slice(0, heads.start // d, heads.length // d, heads.full // d)
    return ShardSpec((heads,))


def shard_spec(name: str, shard_id: Any, layout: TPLayout, cfg: ModelConfig) -> ShardSpec:
    """The slices of our parameter `name` (after renames and fusing; shard_id as the loader routes it)
    that `layout.rank` reads. Quantized packs (`weight_packed`, `weight_scale`) slice like weights:
    rows for a column-parallel layer; whole packed columns / scale groups for a row-parallel one
    (`quant_columns` turns element columns into theirs)."""
    module, _, leaf = name.rpartition(".")
    kind = module.rpartition(".")[2] or module
    if (
        layout.size == 1 or leaf == "weight_shape"
    ):  # weight_shape: checked and rewritten by local_weight_shape
        return REPLICATED
    # a MoE's shared expert: an MLP of its own intermediate size
    inter = layout.shared_intermediate_size if ".shared_expert." in name else None
    if kind == "qkv_proj":
        return _qkv_spec(shard_id, layout)
    if kind == "gate_up_proj":
        return _gate_up_spec(shard_id, layout, inter)
    if kind == "up_proj":
        return ShardSpec((_intermediate_rows(layout, inter),))
    if kind in _ROW:
        return _row_parallel_spec(kind, leaf, layout, inter)
    if kind in ("embed_tokens", "lm_head"):
        return _vocab_spec(layout)
    if kind in ("q_norm", "k_norm") and leaf == "weight":
        return _qk_norm_spec(kind, layout, cfg.qk_norm)
    return REPLICATED


def quant_columns(spec: ShardSpec, leaf: str, elements_per_column: int, layer: str) -> ShardSpec:
    """A row-parallel slice of element columns -> the same slice of a quantized pack's columns
    (`elements_per_column` input elements per int32 of weight_packed or per scale group). Refuses a
    shard that would split a packed word or a scale group, naming the layer and the sizes."""
    out = []
    for s in spec.slices:
        if s.dim != 1:
            out.append(s)
            continue
        if s.start % elements_per_column or s.length % elements_per_column:
            raise ValueError(
                f"{layer}.{leaf}: the shard of in_features [{s.start}, {s.start + s.length}) of {s.full} "
                f"does not fall on whole groups of {elements_per_column} inputs; choose a "
                "tensor_parallel_size whose shard of this layer is a multiple of the group size"
            )
        n = elements_per_column
        out.append(Slice(1, s.start // n, s.length // n, s.full // n))
    return ShardSpec(tuple(out), spec.zero)


def read_slices(handle: Any, spec: ShardSpec, name: str) -> torch.Tensor:
    """Reads only this rank's part of a checkpoint tensor. `handle` is a safetensors slice
    (`safe_open(...).get_slice(name)`: indexing it reads just those bytes) or a tensor."""
    shape = list(handle.get_shape()) if hasattr(handle, "get_shape") else list(handle.shape)
    if spec.zero:
        dtype = handle.dtype if isinstance(handle, torch.Tensor) else None
        whole = handle[:] if dtype is None else handle
        return torch.zeros_like(whole)
    if spec.replicated:
        return handle[:] if not isinstance(handle, torch.Tensor) else handle
    parts = []
    for s in spec.slices:
        if s.dim >= len(shape) or shape[s.dim] != s.full:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {shape}; tensor parallelism expects {s.full} along "
                f"dim {s.dim}"
            )
        index = (
            (slice(s.start, s.start + s.length),)
            if s.dim == 0
            else (slice(None), slice(s.start, s.start + s.length))
        )
        part = handle[index]
        if s.pad:
            part = torch.cat([part, part.new_zeros((s.pad, *part.shape[1:]))])
        parts.append(part)
    dim = spec.slices[0].dim
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


# --- modules whose math changes -------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + Vp) of the embedding; ids outside look up zeros, and the all-reduce sums the
    one rank that holds each id. Keeps `weight` (tied LM heads read it)."""

    def __init__(self, local_vocab: int, dim: int, start: int, group: TPGroup):
        super().__init__(local_vocab, dim)
        self.start, self.group = start, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        local = input_ids - self.start
        foreign = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(foreign, 0), self.weight)
        return self.group.all_reduce(x.masked_fill(foreign[:, None], 0.0))


class ShardedFullRMSNorm(nn.Module):
    """OLMo2's q/k norm (RMS over all heads' H * D values) on one rank's heads: the mean square is
    all-reduced (divided by `replicas` when KV heads are replicated, each counted that many times)."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, group: TPGroup, replicas: int = 1):
        super().__init__()
        self.full_dim, self.eps, self.group, self.replicas = full_dim, eps, group, replicas
        self.weight = nn.Parameter(torch.ones(local_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, local_dim]
        xf = x.float()
        sq = self.group.all_reduce(xf.pow(2).sum(-1, keepdim=True)) / self.replicas
        return (xf * torch.rsqrt(sq / self.full_dim + self.eps)).to(x.dtype) * self.weight


class _HeadOffsetNorms(nn.Module):
    """StableLM's per-head norm modules on one rank: the checkpoint's norms.<h> for every head stay
    (they are tiny), and the rank applies those of its heads [start, start + n)."""

    def __init__(self, inner: Any, start: int):  # a HeadNormList
        super().__init__()
        self.norms, self.start = inner.norms, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, n, D]
        return torch.stack([self.norms[self.start + h](x[:, h]) for h in range(x.shape[1])], dim=1)


def _all_reduce_output(group: TPGroup):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output)

    return hook


def parallelize(model: nn.Module, cfg: ModelConfig, layout: TPLayout, group: TPGroup) -> None:
    """Turns a decoder built from `local_config` into rank `layout.rank`'s shard (before weights load):
    row-parallel outputs all-reduced, a vocab-parallel embedding, q/k norms that span heads."""
    from lmforge.runtime.models.decoder import MLP, Attention, HeadNormList
    from lmforge.runtime.models.moe import SparseMoeBlock

    if layout.size == 1:
        return
    inner: Any = model.model  # the decoder body (embed_tokens, layers, norm)
    old = inner.embed_tokens
    inner.embed_tokens = VocabParallelEmbedding(
        layout.local_vocab, old.embedding_dim, layout.vocab_start, group
    )
    # shared experts: their partial output joins the MoE block's one all-reduce, not one of their own
    shared = {id(m.shared_expert) for m in model.modules() if isinstance(m, SparseMoeBlock)}
    for module in model.modules():
        if isinstance(module, Attention):
            module.o_proj.register_forward_hook(_all_reduce_output(group))
            if cfg.qk_norm == "full":
                d = layout.head_dim
                module.q_norm = ShardedFullRMSNorm(
                    layout.local_heads * d, layout.num_heads * d, cfg.rms_norm_eps, group
                )
                module.k_norm = ShardedFullRMSNorm(
                    layout.local_kv_heads * d,
                    layout.num_kv_heads * d,
                    cfg.rms_norm_eps,
                    group,
                    layout.kv_replicas,
                )
            elif cfg.qk_norm == "head_layer_modules":
                full = HeadNormList(layout.num_heads, layout.head_dim, cfg.rms_norm_eps)
                full_k = HeadNormList(layout.num_kv_heads, layout.head_dim, cfg.rms_norm_eps)
                module.q_norm = _HeadOffsetNorms(full, layout.head_start)
                module.k_norm = _HeadOffsetNorms(full_k, layout.kv_head_start)
        elif isinstance(module, SparseMoeBlock):
            module.register_forward_hook(_all_reduce_output(group))
        elif isinstance(module, MLP) and id(module) not in shared:
            module.down_proj.register_forward_hook(_all_reduce_output(group))


def check_parallel_support(model_class: type, architecture: str, cfg: ModelConfig | None = None) -> None:
    """The older families (gpt2.py, opt.py, bloom.py, mpt.py, falcon.py) have their own graphs, not
    split; nor is latent attention (the MLA families: DeepSeek-V2/V3, MiniCPM3) yet: refused by name
    rather than loaded unsplit behind a row-parallel all-reduce. MoE layers split by expert."""
    from lmforge.runtime.models.decoder import DecoderForCausalLM

    if not issubclass(model_class, DecoderForCausalLM):
        raise ValueError(
            f"tensor_parallel_size > 1 is not supported for {architecture} (its own graph file is not "
            "sharded); serve it with tensor_parallel_size=1"
        )
    unsplit = [what for what, on in (("multi-head latent attention", cfg and cfg.mla),) if on]
    if unsplit:
        raise ValueError(
            f"tensor_parallel_size > 1 is not supported for {architecture} yet ({' and '.join(unsplit)} "
            "are not sharded); serve it with tensor_parallel_size=1"
        )


def local_weight_shape(loaded: torch.Tensor, weight_spec: ShardSpec, name: str) -> torch.Tensor:
    """A quantized layer's `weight_shape` [N, K] (the full layer) -> this rank's [N_local, K_local],
    after checking the checkpoint's sizes against the model's."""
    n, k = (int(v) for v in loaded.tolist())
    rows = [s for s in weight_spec.slices if s.dim == 0]
    cols = [s for s in weight_spec.slices if s.dim == 1]
    for s, have in [(s, n) for s in rows] + [(s, k) for s in cols]:
        if have != s.full:
            raise ValueError(f"{name} {[n, k]} does not match the model ({s.full} along dim {s.dim})")
    if rows:
        n = sum(s.length + s.pad for s in rows)
    if cols:
        k = sum(s.length for s in cols)
    return torch.tensor([n, k], dtype=loaded.dtype)
