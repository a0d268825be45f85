import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.quant_gemm import dequantize_weight, pack_int_weights, quant_linear, unpack_int_weights

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}  # fmt: skip


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


@pytest.mark.parametrize(
    "bits,values,word",
    [
        (4, [-8, -7, -1, 0, 1, 2, 6, 7], 0xFEA98710),
        (4, [0, 1, 2, 3, 4, 5, 6, 7], 0xFEDCBA98),
        (4, [1, 0, 0, 0, 0, 0, 0, 0], 0x88888889),
        (8, [-128, -1, 0, 127], 0xFF807F00),
    ],
)
def test_pack_vectors_from_the_format_notes(bits, values, word):
    packed = pack_int_weights(torch.tensor([values]), bits)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert _u32(int(packed)) == word
    assert torch.equal(
        unpack_int_weights(packed, bits, (1, len(values))), torch.tensor([values], dtype=torch.int8)
    )


def test_packed_bytes_are_little_endian_words():
    packed = pack_int_weights(torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7]]), 4)
    assert int(packed) == -22444272
    assert packed.numpy().tobytes() == bytes([0x10, 0x87, 0xA9, 0xFE])
    assert int(pack_int_weights(torch.tensor([[-128, -1, 0, 127]]), 8)) == -8356096


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 64), (5, 20), (1, 7)])
def test_pack_unpack_round_trip(bits, shape):
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, shape)
    packed = pack_int_weights(q, bits)
    assert packed.shape == (shape[0], -(-shape[1] * bits // 32))
    assert torch.equal(unpack_int_weights(packed, bits, shape), q.to(torch.int8))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int_weights(torch.tensor([[8, 0, 0, 0, 0, 0, 0, 0]]), 4)


def test_dequantize_per_group_and_per_channel():
    q = torch.randint(-8, 8, (4, 256))
    packed = pack_int_weights(q, 4)
    scale = torch.rand(4, 2, dtype=torch.bfloat16)
    w = dequantize_weight(packed, scale, 4, (4, 256))
    assert w.dtype == torch.bfloat16
    assert torch.equal(w[:, :128], q[:, :128].to(torch.bfloat16) * scale[:, :1])
    assert torch.equal(w[:, 128:], q[:, 128:].to(torch.bfloat16) * scale[:, 1:])
    per_channel = dequantize_weight(packed, scale[:, :1], 4, (4, 256))
    assert torch.equal(per_channel, q.to(torch.bfloat16) * scale[:, :1])


def _random_layer(bits, out_features, in_features, group_size, dtype, device):
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (out_features, in_features))
    packed = pack_int_weights(q, bits).to(device)
    num_groups = in_features // group_size
    scale = (torch.rand(out_features, num_groups) * 0.02 / half + 0.001).to(dtype).to(device)
    return packed, scale


# (bits, M, N, K, group): GEMV (M <= 4) and GEMM paths, group 32 / 64 / 128 / per-channel, N not a tile multiple.
SHAPES = [
    (4, 1, 40, 128, 128),
    (4, 3, 24, 256, 64),
    (8, 1, 24, 96, 96),
    (4, 20, 40, 128, 32),
    (8, 17, 24, 128, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "bits,m,n,k,group", SHAPES, ids=[f"w{b}-m{m}-n{n}-k{k}-g{g}" for b, m, n, k, g in SHAPES]
)
def test_quant_linear_matches_reference(device, dtype, bits, m, n, k, group):
    packed, scale = _random_layer(bits, n, k, group, dtype, device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device) if bits == 4 else None
    out = quant_linear(x, packed, scale, bits, bias)
    ref = reference.quant_linear(x, packed, scale, bits, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_quant_linear_leading_dims(device):
    packed, scale = _random_layer(4, 16, 128, 128, torch.float32, device)
    x = torch.randn(2, 3, 128, device=device)
    out = quant_linear(x, packed, scale, 4)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, reference.quant_linear(x, packed, scale, 4), **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 4096)], ids=["w4a16-g128", "w8a16-channel"])
@pytest.mark.parametrize("m", [1, 4, 16, 256])
def test_quant_linear_llama_sizes_gpu(bits, group, m):
    packed, scale = _random_layer(bits, 14336, 4096, group, torch.bfloat16, "cuda")
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(quant_linear(x, packed, scale, bits), reference.quant_linear(x, packed, scale, bits),
                               atol=5e-2, rtol=5e-2)  # fmt: skip
