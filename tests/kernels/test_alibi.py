"""alibi_slopes against transformers' own ALiBi builders (BLOOM, Falcon, MPT), power-of-two head counts or not."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from lmforge.kernels.alibi import alibi_slopes
from lmforge.kernels.reference import alibi_slopes as exported

HEAD_COUNTS = [1, 2, 3, 5, 6, 8, 12, 16, 20, 32, 40, 71, 112]


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_slopes_equal_bloom_and_falcon_bit_for_bit(num_heads):
    mask = torch.ones(1, 4)
    slopes = alibi_slopes(num_heads)
    assert torch.equal(slopes, bloom_alibi(mask, num_heads, torch.float32)[:, 0, 1])  # slope * position 1
    # Falcon rounds its slopes to bf16 before use: a Falcon-alibi model must pass them so rounded
    assert torch.equal(slopes.bfloat16().float(), falcon_alibi(mask, num_heads, torch.float32)[:, 0, 1])
    assert num_heads < 12 or not torch.equal(slopes.bfloat16().float(), slopes)  # the rounding is real


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
@pytest.mark.parametrize("max_bias", [8.0, 16.0])
def test_slopes_match_mpt_with_its_bias_max(num_heads, max_bias):
    hf = -build_mpt_alibi_tensor(num_heads, 2, alibi_bias_max=max_bias)[:, 0, 0]  # slope * (0 - 1)
    torch.testing.assert_close(
        alibi_slopes(num_heads, max_bias), hf, rtol=2e-6, atol=0
    )  # fp32 rounding of 1 / 2 ** m vs base ** k


def test_slopes_are_decreasing_and_exported_from_reference():
    s = alibi_slopes(8)
    assert exported is alibi_slopes
    assert s[0] == 0.5 and s[-1] == 2.0**-8 and torch.all(s[1:] < s[:-1])


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(num_heads=4, max_bias=0.0)])
def test_bad_arguments_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="num_heads|max_bias"):
        alibi_slopes(**bad)
