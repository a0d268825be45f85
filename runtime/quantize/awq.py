"""AWQ (Lin et al. 2023): protect the input channels that carry large activations by scaling them up
before round-to-nearest, and fold the inverse scale into the operation that produces those inputs.

For linears W_1..W_m sharing the input X [n, in] (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, o after v, down after up), with per-channel scales s [in]:

    X W^T = (X / s) (W * s)^T        (exact; X / s is folded into the preceding norm or linear)
    loss(s) = sum_i || X W_i^T - (X / s) Q(W_i * s)^T ||^2 / n

s = mean|X|^alpha (normalised), alpha searched on a grid over [0, 1]. alpha = 0 is s = 1, plain RTN,
so the chosen scales never reconstruct worse than RTN on the calibration inputs. (The paper measures
the loss on the whole block's output; per-linear output keeps the search local and cheap.)

Then, as AWQ does, the clipping range of each (output channel, group) is searched: the scale is
r * absmax / 7.5 with r in CLIP_RATIOS, picking per group the r whose outputs X_g (W_g - Q_g)^T are
closest. q_proj / k_proj are not clipped (their errors land in the attention logits), and a clipped
Linear is kept only if its whole output error is below the unclipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from lmforge.runtime.quantize.awq_pairs import ScalePair
from lmforge.runtime.quantize.rtn import dequantize_int, int_range, quantize_int, rtn_int, store_scale

GRID = 20  # alphas 0, 1/20, ..., 1
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
NO_CLIP = ("q_proj", "k_proj")
CLIP_ROWS = 1024  # calibration rows the clip search looks at (the final check uses all sampled rows)


class ActivationStats:
    """Per input channel mean |x| over every token, plus a bounded sample of rows for the loss."""

    def __init__(self, in_features: int, max_rows: int = 4096, seed: int = 0):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.num_tokens = 0
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).detach().float()
        self.abs_sum += x.abs().sum(0).double().cpu()
        self.num_tokens += x.shape[0]
        self.rows.append(x.cpu())
        kept = sum(r.shape[0] for r in self.rows)
        if kept > 2 * self.max_rows:  # thin out: uniform over everything seen so far
            all_rows = torch.cat(self.rows)
            pick = torch.randperm(all_rows.shape[0], generator=self.generator)[: self.max_rows]
            self.rows = [all_rows[pick.sort().values]]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.num_tokens, 1)).float()

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        if rows.shape[0] > self.max_rows:
            pick = torch.randperm(rows.shape[0], generator=self.generator)[: self.max_rows]
            rows = rows[pick.sort().values]
        return rows


@dataclass(frozen=True, slots=True)
class ScaleSearch:
    alpha: float
    scales: torch.Tensor  # [in] fp32
    loss: float  # at the chosen alpha
    rtn_loss: float  # at alpha = 0 (plain RTN)


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def reconstruction_loss(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """sum_i ||X W_i^T - (X / s) Q(W_i * s)^T||^2 / n, Q = symmetric RTN in the checkpoint layout
    (`reference`: the X W_i^T, when the caller computed them once for many scales)."""
    total = 0.0
    x = x.float()
    x_scaled = x / scales
    for i, w in enumerate(weights):
        w = w.float()
        q, scale = rtn_int(w * scales, bits, group_size, dtype)
        exact = reference[i] if reference is not None else x @ w.t()
        total += float((exact - x_scaled @ dequantize_int(q, scale).float().t()).pow(2).sum())
    return total / max(x.shape[0], 1)


def search_scales(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    mean_abs: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    grid: int = GRID,
) -> ScaleSearch:
    """weights: W_i [out_i, in] sharing the input; x [n, in] calibration inputs; mean_abs [in]."""
    x = x.to(weights[0].device).float()
    reference = [x @ w.float().t() for w in weights]
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_loss = 0.0
    for step in range(grid + 1):
        alpha = step / grid
        scales = awq_scales(mean_abs, alpha).to(x.device)
        loss = reconstruction_loss(weights, x, scales, bits, group_size, dtype, reference)
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, scales)
    assert best is not None
    return ScaleSearch(alpha=best[1], scales=best[2], loss=best[0], rtn_loss=rtn_loss)


def output_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X (q * scale)^T||^2 / n."""
    x = x.float()
    return float((x @ (w.float() - dequantize_int(q, scale).float()).t()).pow(2).sum()) / max(x.shape[0], 1)


def clipped_scales(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Per (output channel, group) scale r * absmax / ((2^bits - 1) / 2), r from `ratios` minimising that
    group's output error sum_n (x_n,g . (w_g - q_g))^2 on the calibration rows x [n, in]."""
    out_features, in_features = w.shape
    group = in_features if group_size <= 0 else group_size
    num_groups = in_features // group
    low, high = int_range(bits)
    xg = x.float().view(x.shape[0], num_groups, group)
    best = torch.empty(out_features, num_groups, dtype=dtype, device=w.device)
    for start in range(0, out_features, rows_per_chunk):  # bounded memory: [n, rows, groups] at a time
        wg = w[start : start + rows_per_chunk].float().view(-1, num_groups, group)
        absmax = wg.abs().amax(-1)
        best_err = torch.full_like(absmax, float("inf"))
        for ratio in ratios:
            scale = store_scale(absmax * ratio / ((2**bits - 1) / 2), dtype)
            s = scale.float()[..., None]
            diff = wg - torch.round(wg / s).clamp(low, high) * s
            err = torch.einsum("ngk,ogk->nog", xg, diff).pow(2).sum(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start : start + rows_per_chunk] = torch.where(
                better, scale, best[start : start + rows_per_chunk]
            )
    return best


def quantize_with_clipping(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): clipped where that lowers the whole output error on x, else plain RTN."""
    q, scale = rtn_int(w, bits, group_size, dtype)
    clipped = clipped_scales(w, x[:: max(1, x.shape[0] // CLIP_ROWS)], bits, group_size, dtype)
    q_clipped = quantize_int(w, clipped, bits)
    if output_error(w, q_clipped, clipped, x) < output_error(w, q, scale, x):
        return q_clipped, clipped
    return q, scale


def _is_one_plus_weight_norm(module: nn.Module) -> bool:
    """Gemma's RMSNorm scales by (1 + weight) (weight initialised to 0)."""
    return type(module).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


@torch.no_grad()
def fold_scales(
    previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """previous's output channel c is divided by s[c] (a norm's weight and bias, or a linear's rows + bias;
    `rows`: which output rows of a fused linear are the consumers' inputs); each following linear's input
    column c is multiplied by s[c]. The block's function is unchanged."""
    weight = cast(torch.Tensor, previous.weight)  # a norm's or a linear's
    bias: torch.Tensor | None = getattr(previous, "bias", None)
    s = scales.to(device=weight.device, dtype=torch.float32)
    if isinstance(previous, nn.Linear):
        index = (
            torch.arange(weight.shape[0], device=weight.device) if rows is None else rows.to(weight.device)
        )
        weight[index] = (weight[index].float() / s[:, None]).to(weight.dtype)
        if bias is not None:
            bias[index] = (bias[index].float() / s).to(bias.dtype)
    else:  # a norm: y = weight * normalized(x) (+ bias); Gemma: (1 + weight) * normalized(x)
        if _is_one_plus_weight_norm(previous):
            weight.copy_(((1.0 + weight.float()) / s - 1.0).to(weight.dtype))
        else:
            weight.copy_((weight.float() / s).to(weight.dtype))
        if bias is not None:
            bias.copy_((bias.float() / s).to(bias.dtype))
    for linear in linears:
        linear.weight.copy_((linear.weight.float() * s[None, :]).to(linear.weight.dtype))


def pair_rows(pair: ScalePair, previous: nn.Module, num_heads: int) -> torch.Tensor | None:
    """Output rows of a fused `previous` that its pair's consumers read (None: all of them)."""
    if pair.rows is None:
        return None
    out = cast(torch.Tensor, previous.weight).shape[0]
    if pair.rows == "second_half":
        return torch.arange(out // 2, out)
    if pair.rows == "v_last":
        return torch.arange(2 * out // 3, out)  # [q | k | v] with as many v rows as q rows (no GQA)
    if pair.rows == "v_interleaved":
        head_dim = out // (3 * num_heads)
        heads = torch.arange(num_heads)[:, None] * 3 * head_dim + 2 * head_dim  # [H, 1]: start of head h's v
        return (heads + torch.arange(head_dim)[None, :]).reshape(-1)
    raise ValueError(f"unknown AWQ row selector {pair.rows!r}")


def layer_groups(
    layer: nn.Module, quantized: set[str], pairs: list[ScalePair], num_heads: int
) -> list[tuple[ScalePair, torch.Tensor | None]]:
    """The `pairs` present in `layer` whose consumers are all quantized and whose shapes allow the fold
    (v -> o only without grouped-query attention: o's input channels must be v's output channels).
    A pair whose `previous` exists must list all of the linears its output feeds (awq_pairs.py)."""
    modules = dict(layer.named_modules())
    groups = []
    for pair in pairs:
        if pair.previous not in modules or getattr(modules[pair.previous], "weight", None) is None:
            continue  # e.g. OLMo's parameter-free LayerNorm
        if not all(name in modules and name in quantized for name in pair.consumers):
            continue
        previous = modules[pair.previous]
        rows = pair_rows(pair, previous, num_heads)
        width = previous.weight.shape[0] if rows is None else len(rows)
        if all(modules[name].in_features == width for name in pair.consumers):
            groups.append((pair, rows))
    return groups
