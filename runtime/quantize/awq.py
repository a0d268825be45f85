"""AWQ (Lin et al. 2023): protect the input channels that carry large activations by scaling them up
before round-to-nearest, and fold the inverse scale into the operation that produces those inputs.

For linears W_1..W_m sharing the input X [n, in] (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, o after v, down after up), with per-channel scales s [in]:

    X W^T = (X / s) (W * s)^T        (exact; X / s is folded into the preceding norm or linear)
    loss(s) = sum_i || X W_i^T - (X / s) Q(W_i * s)^T ||^2 / n

s = mean|X|^alpha (normalised), alpha searched on a grid over [0, 1]. alpha = 0 is s = 1, plain RTN,
so the chosen scales never reconstruct worse than RTN on the calibration inputs. (The paper measures
the loss on the whole block's output; per-linear output keeps the search local and cheap.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.runtime.quantize.rtn import dequantize_int, rtn_int

GRID = 20  # alphas 0, 1/20, ..., 1


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


def reconstruction_loss(weights: list[torch.Tensor], x: torch.Tensor, scales: torch.Tensor, bits: int,
                        group_size: int, dtype: torch.dtype) -> float:
    """sum_i ||X W_i^T - (X / s) Q(W_i * s)^T||^2 / n, Q = symmetric RTN in the checkpoint layout."""
    total = 0.0
    x = x.float()
    x_scaled = x / scales
    for w in weights:
        w = w.float()
        q, scale = rtn_int(w * scales, bits, group_size, dtype)
        diff = x @ w.t() - x_scaled @ dequantize_int(q, scale).float().t()
        total += float(diff.pow(2).sum())
    return total / max(x.shape[0], 1)


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, mean_abs: torch.Tensor, bits: int,
                  group_size: int, dtype: torch.dtype, grid: int = GRID) -> ScaleSearch:
    """weights: W_i [out_i, in] sharing the input; x [n, in] calibration inputs; mean_abs [in]."""
    x = x.to(weights[0].device)
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_loss = 0.0
    for step in range(grid + 1):
        alpha = step / grid
        scales = awq_scales(mean_abs, alpha).to(x.device)
        loss = reconstruction_loss(weights, x, scales, bits, group_size, dtype)
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, scales)
    assert best is not None
    return ScaleSearch(alpha=best[1], scales=best[2], loss=best[0], rtn_loss=rtn_loss)


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """previous's output channel c is divided by s[c] (a norm's weight, or a linear's rows + bias);
    each following linear's input column c is multiplied by s[c]. The block's function is unchanged."""
    s = scales.to(device=previous.weight.device, dtype=torch.float32)
    if isinstance(previous, nn.Linear):
        previous.weight.copy_((previous.weight.float() / s[:, None]).to(previous.weight.dtype))
        if previous.bias is not None:
            previous.bias.copy_((previous.bias.float() / s).to(previous.bias.dtype))
    else:  # RMSNorm-style: y = weight * normalized(x)
        previous.weight.copy_((previous.weight.float() / s).to(previous.weight.dtype))
    for linear in linears:
        linear.weight.copy_((linear.weight.float() * s[None, :]).to(linear.weight.dtype))


# Llama-family layer: (module producing the shared input, linears consuming it), names within a layer.
LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def layer_groups(layer: nn.Module, quantized: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The LLAMA_GROUPS present in `layer` whose linears are all quantized and whose shapes allow a fold
    (v -> o only without grouped-query attention: o's input channels must be v's output channels)."""
    modules = dict(layer.named_modules())
    groups = []
    for previous, linears in LLAMA_GROUPS:
        if previous not in modules or not all(name in modules and name in quantized for name in linears):
            continue
        width = modules[previous].weight.shape[0]
        if all(modules[name].in_features == width for name in linears):
            groups.append((previous, linears))
    return groups
