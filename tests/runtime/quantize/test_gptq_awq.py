"""GPTQ and AWQ against RTN on the same layer and calibration data: reconstruction error ||W X - Q X||
(output of the layer) is never worse, and the AWQ fold leaves the block's function unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.runtime.quantize import awq, gptq, rtn

OUT, IN, TOKENS = 64, 256, 2048


def correlated_inputs(seed: int) -> torch.Tensor:
    """Activations like a real layer's: correlated channels, a few with large magnitude."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(IN) + torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(TOKENS, IN, generator=g) @ mixing
    x[:, :8] *= 10.0  # outlier channels
    return x


def layer(seed: int) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.t() - x @ w_hat.t()).norm())


def hessian(x: torch.Tensor) -> torch.Tensor:
    acc = gptq.HessianAccumulator(IN)
    for part in x.split(300):  # several batches: the running mean must equal the one-shot one
        acc.add(part)
    assert acc.num_tokens == TOKENS
    assert torch.allclose(acc.hessian, 2 * x.t() @ x / TOKENS, rtol=1e-4, atol=1e-4)
    return acc.hessian


@pytest.mark.parametrize(
    "group_size, act_order",
    [(128, True), (128, False), (32, True), (-1, False)],
    ids=["g128-actorder", "g128", "g32-actorder", "channel"],
)
def test_gptq_reconstructs_better_than_rtn(group_size, act_order):
    w, x = layer(1), correlated_inputs(2)
    q, scale = gptq.gptq_quantize(w, hessian(x), 4, group_size, torch.float32, act_order=act_order)
    groups = 1 if group_size == -1 else IN // group_size
    assert q.dtype == torch.int8 and scale.shape == (OUT, groups)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    q_rtn, scale_rtn = rtn.rtn_int(w, 4, group_size, torch.float32)
    gptq_error = output_error(w, rtn.dequantize_int(q, scale), x)
    rtn_error = output_error(w, rtn.dequantize_int(q_rtn, scale_rtn), x)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    if act_order or group_size == -1:  # static scales: exactly RTN's (no g_idx needed in the checkpoint)
        assert torch.equal(scale, scale_rtn)


def test_gptq_dead_inputs_quantize_to_zero():
    w, x = layer(3), correlated_inputs(4)
    x[:, 10] = 0.0
    q, _ = gptq.gptq_quantize(w, hessian(x), 4, 128, torch.float32)
    assert bool((q[:, 10] == 0).all())


def test_awq_reconstructs_no_worse_than_rtn_and_prefers_scaling():
    x = correlated_inputs(5)
    weights = [layer(6), layer(7)]  # two linears sharing the input, like gate/up
    search = awq.search_scales(weights, x, x.abs().mean(0), 4, 128, torch.float32)
    assert search.loss <= search.rtn_loss
    assert search.alpha > 0 and search.loss < 0.95 * search.rtn_loss  # the outlier channels make scaling pay
    rtn_total = awq_total = 0.0
    for w in weights:
        q, s = rtn.rtn_int(w, 4, 128, torch.float32)
        rtn_total += output_error(w, rtn.dequantize_int(q, s), x) ** 2
        q, s = rtn.rtn_int(w * search.scales, 4, 128, torch.float32)
        awq_total += output_error(w, rtn.dequantize_int(q, s) / search.scales, x) ** 2
    assert awq_total <= rtn_total
    assert abs(awq_total / TOKENS - search.loss) < 1e-3 * search.loss


def test_awq_alpha_zero_is_rtn():
    assert torch.equal(awq.awq_scales(torch.rand(IN) + 0.1, 0.0), torch.ones(IN))


class Block(nn.Module):
    """norm -> (a, b); b -> c: the two fold shapes AWQ uses."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(IN, elementwise_affine=True, bias=False)
        self.a, self.b, self.c = nn.Linear(IN, OUT), nn.Linear(IN, IN), nn.Linear(IN, OUT)

    def forward(self, x):
        h = self.norm(x)
        return self.a(h) + self.c(self.b(h))


def test_fold_scales_keeps_the_function():
    torch.manual_seed(0)
    block = Block()
    nn.init.uniform_(block.norm.weight, 0.5, 1.5)
    x = torch.randn(16, IN)
    before = block(x)
    s1, s2 = torch.rand(IN) + 0.5, torch.rand(IN) + 0.5
    awq.fold_scales(block.norm, [block.a, block.b], s1)
    awq.fold_scales(block.b, [block.c], s2)
    assert torch.allclose(block(x), before, atol=1e-5)


def test_awq_clipping_never_loses_to_plain_rtn():
    x, w = correlated_inputs(8), layer(9)
    w[0, 0] = 1.0  # one outlier weight: clipping its group pays off for the other 127 weights
    q, scale = awq.quantize_with_clipping(w, x, 4, 128, torch.float32)
    q_rtn, scale_rtn = rtn.rtn_int(w, 4, 128, torch.float32)
    assert awq.output_error(w, q, scale, x) < awq.output_error(w, q_rtn, scale_rtn, x)
    assert bool((scale <= scale_rtn).all()) and not torch.equal(scale, scale_rtn)
