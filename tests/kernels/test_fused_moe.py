"""Fused MoE (kernels/fused_moe.py) vs its torch reference (kernels/moe_reference.py, a loop over
experts): odd token counts, experts that receive no token, top-k 1, 2 and 8, and the alignment that
sorts (token, slot) pairs by expert. On CPU through the Triton interpreter (tiny shapes); `gpu` cases
run larger shapes on CUDA."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import moe_reference
from lmforge.kernels.fused_moe import BLOCK_M, align_by_expert, fused_moe

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _weights(num_experts: int, hidden: int, inter: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w13.to(dtype).to(device), w2.to(dtype).to(device)


def _route(num_tokens: int, num_experts: int, top_k: int, device, *, unused: tuple[int, ...] = ()):
    """Random distinct experts per token, never one of `unused`; renormalised softmax-like weights."""
    g = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    scores = torch.rand(num_tokens, allowed.numel(), generator=g)
    ids = allowed[scores.topk(top_k, dim=-1).indices]
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).to(device), ids.to(device)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "unused"),
    [
        (1, 4, 1, ()),
        (7, 4, 2, (1,)),  # odd count, one expert gets nothing
        (13, 8, 2, (0, 5, 6)),
        (5, 8, 8, ()),  # every expert, every token
        (33, 6, 1, (2, 3)),  # more than two BLOCK_M blocks for some expert
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_the_expert_loop(device, num_tokens, num_experts, top_k, unused, dtype):
    hidden, inter = 32, 24  # inter not a power of two: masked N and K tiles
    w13, w2 = _weights(num_experts, hidden, inter, dtype, device)
    x = torch.randn(num_tokens, hidden).to(dtype).to(device)
    weights, ids = _route(num_tokens, num_experts, top_k, device, unused=unused)
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    assert ref.abs().mean() > 0.1  # the comparison is not between two zeros


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_other_activations(device, activation):
    w13, w2 = _weights(4, 32, 16, torch.float32, device)
    x = torch.randn(9, 32, device=device)
    weights, ids = _route(9, 4, 2, device)
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids, activation)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, activation), ref, **TOL[torch.float32])
    assert not torch.allclose(ref, moe_reference.fused_moe(x, w13, w2, weights, ids, "silu"))


def test_the_reference_is_a_weighted_sum_of_expert_mlps():
    """The reference itself, against the formula written out per token (no index bookkeeping)."""
    w13, w2 = _weights(4, 16, 8, torch.float32, "cpu")
    x = torch.randn(5, 16)
    weights, ids = _route(5, 4, 2, "cpu")
    out = moe_reference.fused_moe(x, w13, w2, weights, ids)
    for t in range(5):
        want = torch.zeros(16)
        for j in range(2):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            want += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


def test_alignment_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 gets nothing
    sorted_ids, block_experts = align_by_expert(ids, 4, block_m=4)
    num_pairs = ids.numel()
    runs = {}
    for b, e in enumerate(block_experts.tolist()):
        block = sorted_ids[b * 4 : (b + 1) * 4].tolist()
        if e < 0:
            assert all(p == num_pairs for p in block)
            continue
        real = [p for p in block if p < num_pairs]
        assert all(ids.reshape(-1)[p] == e for p in real)
        runs.setdefault(e, []).extend(real)
    assert {e: sorted(p) for e, p in runs.items()} == {0: [1, 4], 2: [0, 2, 5], 3: [3]}
    assert sorted_ids.numel() % 4 == 0 and sorted_ids.numel() >= num_pairs + 4 * 3


def test_ids_outside_this_ranks_experts_are_dropped(device):
    """Expert parallelism: a rank with experts [0, 4) of 8 sees the others' ids as -1 and adds nothing for them."""
    w13, w2 = _weights(8, 32, 16, torch.float32, device)
    x = torch.randn(11, 32, device=device)
    weights, ids = _route(11, 8, 2, device)
    local = torch.where(ids < 4, ids, -1)
    mine = fused_moe(x, w13[:4], w2[:4], weights, local)
    theirs = fused_moe(x, w13[4:], w2[4:], weights, torch.where(ids >= 4, ids - 4, -1))
    torch.testing.assert_close(
        mine + theirs, moe_reference.fused_moe(x, w13, w2, weights, ids), **TOL[torch.float32]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 255])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_fused_moe_gpu_shapes(num_tokens, top_k):
    w13, w2 = _weights(8, 512, 384, torch.bfloat16, "cuda")
    x = torch.randn(num_tokens, 512, device="cuda").to(torch.bfloat16)
    weights, ids = _route(num_tokens, 8, top_k, "cuda", unused=(7,) if top_k < 8 else ())
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(
        fused_moe(x, w13, w2, weights, ids).float(), ref.float(), **TOL[torch.bfloat16]
    )


def test_block_m_is_a_tile_size_tl_dot_accepts():
    assert BLOCK_M >= 16 and BLOCK_M & (BLOCK_M - 1) == 0


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (4, 32), (8, -1), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_match_the_dequantized_loop(device, bits, group, dtype):
    """W4A16 / W8A16 experts (pack-quantized codes + scales, stacked per expert) through the kernel, which
    dequantizes each tile after its load, vs the reference on the dequantized weights."""
    from lmforge.kernels.fused_moe import fused_moe_quant
    from lmforge.kernels.quant_pack import pack_int_weights

    num_experts, hidden, inter = 5, 64, 32

    def quantized(rows: int, cols: int):
        g = cols if group == -1 else group
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (num_experts, rows, cols))
        scale = (torch.rand(num_experts, rows, cols // g) * 0.02 + 0.005).to(dtype)
        packed = torch.stack([pack_int_weights(q[e], bits) for e in range(num_experts)])
        return packed.to(device), scale.to(device)

    w13 = quantized(2 * inter, hidden)
    w2 = quantized(hidden, inter)
    x = torch.randn(11, hidden).to(dtype).to(device)
    weights, ids = _route(11, num_experts, 2, device, unused=(3,))
    ref = moe_reference.fused_moe_quant(x, *w13, *w2, bits, weights, ids)
    out = fused_moe_quant(x, *w13, *w2, bits, weights, ids)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    assert ref.abs().mean() > 0.01
